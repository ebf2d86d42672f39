from setuptools import find_packages, setup

setup(
    name="threatbus-suricata",
    version="2026.11.24",
    description="Threat Bus app plugin for Suricata: indicators become rules or dataset entries, alerts become sightings",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    license="BSD-3-Clause",
    python_requires=">=3.10",
    packages=find_packages(exclude=["tests"]),
    install_requires=["threatbus>=2026.11.24", "orjson"],
    extras_require={"test": ["pytest", "pytest-timeout", "suricataparser==1.0.0"]},
    entry_points={"threatbus.app": ["suricata = threatbus_suricata:SuricataApp"]},
)
