"""
The package list, which setup.cfg cannot express: every package under
mailproxy/ (a new protocol's package included, without a line here), the
twistd plugin directory (no __init__.py, as Twisted wants), and examples/
shipped as mailproxy.examples (see setup.cfg's package_dir).  Everything
else is in setup.cfg.
"""

from setuptools import find_packages, setup

setup(packages=find_packages(include=["mailproxy", "mailproxy.*"]) + ["twisted.plugins", "mailproxy.examples"])
