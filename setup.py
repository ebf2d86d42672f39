from setuptools import find_packages, setup

setup(
    name="threatbus",
    version="2026.11.24",
    description="A pub-sub bus for threat intelligence between security tools",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    license="BSD-3-Clause",
    python_requires=">=3.10",
    packages=find_packages(include=["threatbus", "threatbus.*"]),
    # `threatbus cluster`: a local multi-node tool, outside the core, found through its entry point.
    py_modules=["threatbus_cluster"],
    package_data={"threatbus": ["default_config.yaml", "py.typed"]},
    install_requires=[
        "dynaconf>=3.2",
        "orjson>=3.8",
        "pluggy>=1.3",
        "prometheus-client>=0.17",
        "PyYAML>=6.0",
        "stix2-patterns>=2.0",
    ],
    entry_points={
        "console_scripts": ["threatbus = threatbus.cli:main"],
        "threatbus.command": ["cluster = threatbus_cluster"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Security",
        "Topic :: System :: Networking :: Monitoring",
    ],
)
