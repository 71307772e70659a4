"""The package build's one step beyond pyproject.toml: the JPEG region decoder.

reslab/data/jpeg_region.c is a plain C library (no Python API) that reslab/data/jpeg.py loads
with ctypes, so it is built as reslab/data/_jpeg_region.so whatever the interpreter's extension
suffix, against libjpeg(-turbo). Where no compiler or no jpeglib.h is found the build goes on
without it, saying so once; reslab then decodes whole JPEGs (the same views, slower) and
`reslab --version` names the decoder in use.
"""

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CCompilerError, CompileError, ExecError, LinkError, PlatformError

_FAILURES = (CCompilerError, CompileError, ExecError, LinkError, PlatformError, OSError)


class OptionalJpegRegion(build_ext):
    def get_ext_filename(self, fullname: str) -> str:
        return os.path.join(*fullname.split(".")) + ".so"  # the name jpeg.py loads

    def get_export_symbols(self, ext: Extension) -> list[str]:
        return []  # a ctypes library: no PyInit_ function to export

    def run(self) -> None:
        try:
            super().run()
        except _FAILURES as e:
            self._fell_back(e)

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except _FAILURES as e:
            self._fell_back(e)

    def _fell_back(self, error: Exception) -> None:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"reslab: WARNING: the JPEG region decoder was not built ({first}); reslab will "
              "decode whole JPEGs (the same views, slower). For the decoder install a C compiler "
              "and libjpeg-turbo's headers (Debian: gcc libjpeg62-turbo-dev) and reinstall.",
              file=sys.stderr)


setup(
    ext_modules=[Extension("reslab.data._jpeg_region", ["reslab/data/jpeg_region.c"],
                           libraries=["jpeg"], extra_compile_args=["-O2"])],
    cmdclass={"build_ext": OptionalJpegRegion},
)
