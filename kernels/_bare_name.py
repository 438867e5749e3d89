"""Give the bare module name back to the package that owns it.

retrogram's folders sit at the top of the repository (the layout is fixed) and install as
`retrogram.<folder>`. A process started from the repository root has that root on sys.path, where the
folder `kernels/` would be found as the top-level module `kernels` - the name of Hugging Face's
distribution. `hand_over` loads the module of that name from the rest of sys.path in place of this one.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys


def hand_over(name: str, init_file: str) -> None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(init_file)))
    path = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
    sys.modules.pop(f"{name}._bare_name", None)
    spec = importlib.machinery.PathFinder.find_spec(name, path)
    if spec is None:
        sys.modules.pop(name, None)
        raise ModuleNotFoundError(f"No module named {name!r} (the folder {root}/{name} is retrogram.{name}, "
                                  f"not a top-level package)", name=name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module   # the import statement returns what sys.modules holds once this module ends
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
