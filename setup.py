from setuptools import find_packages, setup

setup(
    name="gochat",
    version="0.1.0",
    description="A TCP chat server on gevent that mirrors Go's goroutine-per-connection model",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["gochat", "gochat.*"]),
    install_requires=[
        "gevent>=23.9",
        "greenlet>=3.0",
        "ujson>=5.8",
        "click>=8.1",
        "prometheus-client>=0.19",
        "PyJWT[crypto]>=2.8",
        "redis>=5.0",
        "hiredis>=2.3",
    ],
    extras_require={
        "test": ["pytest>=7.4", "pytest-timeout>=2.2", "hypothesis>=6.90", "locust>=2.20", "cryptography>=41",
                 "PyYAML>=6.0"],
        "load": ["locust>=2.20"],
        "bench": ["matplotlib>=3.7"],
    },
    entry_points={"console_scripts": ["gochat=gochat.cli:main"]},
)
