from setuptools import find_packages, setup

setup(
    name="threatbus-rabbitmq",
    version="2026.11.24",
    description="Threat Bus RabbitMQ backbone: several nodes share intel through one exchange",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    license="BSD-3-Clause",
    python_requires=">=3.10",
    packages=find_packages(exclude=["tests", "bench"]),
    install_requires=["threatbus>=2026.11.24", "pika>=1.3", "rstream>=1.1"],
    extras_require={"test": ["pytest>=7", "pytest-timeout>=2", "pyzmq>=25"]},
    entry_points={"threatbus.backbone": ["rabbitmq = threatbus_rabbitmq:RabbitMQBackbone"]},
)
