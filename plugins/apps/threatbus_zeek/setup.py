from setuptools import find_packages, setup

setup(
    name="threatbus-zeek",
    version="2026.11.24",
    description="Threat Bus app plugin for Zeek: indicators into Zeek's Intel framework, matches back as sightings",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    license="BSD-3-Clause",
    python_requires=">=3.10",
    # The Zeek scripts are data in a directory without __init__.py: list it as a package of its own.
    packages=[*find_packages(exclude=["tests"]), "threatbus_zeek.scripts"],
    package_data={"threatbus_zeek.scripts": ["*.zeek"]},
    install_requires=["threatbus>=2026.11.24", "websockets>=15.0"],
    extras_require={"test": ["pytest", "zeek-client>=1.5", "zeekscript>=1.2"]},
    entry_points={"threatbus.app": ["zeek = threatbus_zeek:ZeekApp"]},
)
