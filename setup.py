"""What pyproject.toml cannot say: the compiled codec (an optional C extension), and the dialect files of
specs/ shipped inside wheels as gateway/_specs (gateway.iso.spec.spec_dirs looks there first, then in a
checkout's specs/, which is what an editable install uses). Everything else is in pyproject.toml.

`Extension(optional=True)` makes a failed compile (no C compiler, no Python headers: try
`CC=false pip install .`) a warning, and the package installs with the pure-Python codec only;
`gateway --version` says which codec is in use.

The extension records the sha256 of the `_ccodec.c` it was built from, so that a checkout whose C file
changed since the last build does not run the old binary (gateway/iso/_compiled.py refuses it; rebuild
with `pip install -e .`).
"""

import hashlib
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_py import build_py

SOURCE = Path("gateway/iso/_ccodec.c")


class BuildPyWithSpecs(build_py):
    """Copies specs/*.toml to gateway/_specs in the build tree (a wheel). Not a package_dir mapping:
    that would turn editable installs into import-hook installs, which an empty `gateway` directory
    left in site-packages by an older install shadows."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = Path(self.build_lib, "gateway", "_specs")
        self.mkpath(str(target))
        for toml in sorted(Path("specs").glob("*.toml")):
            self.copy_file(str(toml), str(target / toml.name))


setup(
    cmdclass={"build_py": BuildPyWithSpecs},
    ext_modules=[
        Extension(
            "gateway.iso._ccodec",
            sources=[str(SOURCE)],
            define_macros=[("GATEWAY_CCODEC_SOURCE_HASH", f'"{hashlib.sha256(SOURCE.read_bytes()).hexdigest()}"')],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-missing-field-initializers"],
            optional=True,
        )
    ],
)
