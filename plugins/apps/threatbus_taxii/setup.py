from setuptools import find_packages, setup

setup(
    name="threatbus-taxii",
    version="2026.11.30",
    description="Threat Bus app plugin for TAXII 2.1: polls collections onto the bus and serves the bus's intel",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    license="BSD-3-Clause",
    python_requires=">=3.10",
    packages=find_packages(exclude=["tests"]),
    install_requires=["threatbus>=2026.11.24", "taxii2-client>=2.3.0", "medallion>=3.0.0", "werkzeug"],
    extras_require={"test": ["pytest"]},
    entry_points={"threatbus.app": ["taxii = threatbus_taxii:TaxiiApp"]},
)
