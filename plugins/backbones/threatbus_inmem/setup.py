from setuptools import find_packages, setup

setup(
    name="threatbus-inmem",
    version="2026.11.24",
    description="Threat Bus in-memory backbone: one node, no broker",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    license="BSD-3-Clause",
    python_requires=">=3.10",
    packages=find_packages(exclude=["tests"]),
    install_requires=["threatbus>=2026.11.24"],
    entry_points={"threatbus.backbone": ["inmem = threatbus_inmem:InMemoryBackbone"]},
)
