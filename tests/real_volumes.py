"""Real MRI volumes for tests: Debian's mricron-data and the MNI152 templates nilearn ships.

`make test` installs mricron-data (see the Makefile's test-data target). Outside CI a missing
package skips the test with the install command; in CI (CI=true) it fails, so a missing install
step cannot hide behind skips.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

MRICRON = Path("/usr/share/mricron/templates")
# Colin27 T1 (ch2) and the AAL atlas share one 181x217x181 1 mm RAS grid.
COLIN27_T1 = MRICRON / "ch2.nii.gz"
AAL_ATLAS = MRICRON / "aal.nii.gz"
# INIA19 macaque T1 and its NeuroMaps labels: 168x206x128 at 0.5 mm.
INIA19_T1 = MRICRON / "inia19-t1-brain.nii.gz"
INIA19_LABELS = MRICRON / "inia19-NeuroMaps.nii.gz"


def require(path: Path) -> Path:
    """`path`, or skip (fail in CI) with the command that installs it."""
    if path.exists():
        return path
    message = f"{path} is missing: run `make test-data` (apt-get install mricron-data)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def mni152_t1_path() -> Path:
    """The MNI152 2009a T1 template file inside the installed nilearn package (no download)."""
    import nilearn

    path = (Path(nilearn.__file__).parent / "datasets" / "data"
            / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
    return require(path)
