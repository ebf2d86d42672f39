from setuptools import find_packages, setup

setup(
    name="threatbus-zmq",
    version="2026.11.24",
    description="Threat Bus ZeroMQ app plugin: apps join the bus over ZeroMQ; publish and tail tools",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    license="BSD-3-Clause",
    python_requires=">=3.10",
    packages=find_packages(exclude=["tests"]),
    install_requires=["threatbus>=2026.11.24", "pyzmq>=25", "orjson>=3.8", "tqdm>=4.60"],
    extras_require={"test": ["pytest>=7", "pytest-timeout>=2", "threatbus-inmem>=2026.11.24"]},
    entry_points={
        "threatbus.app": ["zmq = threatbus_zmq:ZmqApp"],
        "console_scripts": ["threatbus-zmq = threatbus_zmq.cli:main"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Security",
        "Topic :: System :: Networking :: Monitoring",
    ],
)
