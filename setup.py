"""Packaging: setup.cfg holds the metadata; this adds the start-up hook.

``torch_arena/startup.pth`` is copied to the top of the built tree as
``torch_arena-startup.pth``, so a wheel installs it into site-packages, where
Python runs its one line at every start (it reads ``TORCH_ARENA``; see
``torch_arena/_startup.py``). Editable installs do not carry it: ``python -m
torch_arena install-hook`` adds it (``make`` does).
"""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

HOOK = "torch_arena-startup.pth"


class BuildWithStartupHook(build_py):
    def run(self) -> None:
        super().run()
        self.copy_file(os.path.join("torch_arena", "startup.pth"), os.path.join(self.build_lib, HOOK))

    def get_outputs(self, include_bytecode: bool = True) -> list:
        return [*super().get_outputs(include_bytecode), os.path.join(self.build_lib, HOOK)]


setup(cmdclass={"build_py": BuildWithStartupHook})
