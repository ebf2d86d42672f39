from setuptools import find_packages, setup

setup(
    name="threatbus-misp",
    version="2026.11.24",
    description="Threat Bus app plugin for MISP: to_ids attributes become indicators, sightings go back to MISP",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    license="BSD-3-Clause",
    python_requires=">=3.10",
    packages=find_packages(exclude=["tests"]),
    install_requires=["threatbus>=2026.11.24", "orjson", "pymisp>=2.4.190", "misp-stix>=2.4.190", "pyzmq"],
    extras_require={
        "kafka": ["confluent-kafka>=2.0"],
        "test": ["pytest", "pytest-timeout", "confluent-kafka>=2.0"],
    },
    entry_points={"threatbus.app": ["misp = threatbus_misp:MispApp"]},
)
