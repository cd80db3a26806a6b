"""Real image-text datasets for the CLIP data-selection benchmark.

Everything here is built from data that ships in Debian or PyPI packages
(installed by ``benchmarks/selection/install_data.sh``); nothing is fetched at
run time.

* :func:`load_general` -- a clean general-domain pretraining set (Tux Paint stamps,
  Openclipart clip art, Noto colour emoji, Animal-MNIST silhouettes, MNIST digits)
  plus one held-out evaluation :class:`Suite` per source.
* :func:`load_fashion` -- target A: Fashion-MNIST with a noisy candidate pool, a small
  clean target eval set and the held-out test split as a :class:`Suite`.
* :func:`load_fashion_sheets` -- v2 target ``sheets`` (issue 10): 2x2 catalogue sheets of tinted
  Fashion-MNIST items with grounded captions (positions, tints, sizes), stated noise, and
  warm-up sheets for the base model (captioned coarsely or, as the v2 runner does by default, in the
  pool's grammar).
* :func:`load_animal_sheets` -- v2 target ``animal_sheets``: the same sheets of Animal-MNIST
  silhouettes (the general mix's single silhouettes are the base model's coarse knowledge; the
  test sheets use only silhouettes the general mix holds out).
* :func:`load_icons` -- target ``icons`` (a third target of a different kind): zero-shot classification of
  desktop icons of eleven Debian icon themes (PNG) in 18 classes, each drawn on a background at a size, in colour
  or grayscale, captioned with class synonyms and true attributes; stated noise (:data:`ICON_NOISE`: mismatched,
  partly wrong, near-duplicate, off-domain), a clean eval set, a test suite with classnames and templates, and
  warm-up pairs from a disjoint split; test icons share no source group with pool, eval or warm-up icons.
* :func:`load_medical` -- target B: brain MRI (mricron-data templates, AAL atlas region
  captions), head CT (invesalius-examples) and pydicom test DICOM frames, split into
  train/test by alternating slice blocks with gaps.

Everything depends only on ``seed``.  Expensive raw decoding (PNG decoding, emoji
rendering, volume slicing) is cached as ``.npz`` under
``$CHIPS_CACHE/selection_data/`` (default ``~/.cache/chips/selection_data/``);
the functions work without a cache (it is created on first use; if it cannot be
written the data is just rebuilt every time).

Run ``python benchmarks/selection/datasets`` (or ``python -m datasets`` from
``benchmarks/selection``) to build everything (quick and full), print sizes / class
counts / noise fractions and write contact sheets to ``/tmp/selection_data_*.png``.

Modules: ``common`` (containers, cache, image decoding, text helpers, the noise recipe
shared by the targets), ``templates`` (caption templates and vocabularies), one builder
each in ``general``, ``fashion``, ``sheets``, ``icons`` and ``medical``, and ``__main__`` (the command line).
"""
from __future__ import annotations

from .common import CACHE_VERSION, INSTALL_HINT, NOISE, PairSet, Suite, Target, contact_sheet
from .fashion import load_fashion
from .general import load_general
from .icons import ICON_CLASSNAMES, ICON_NOISE, ICON_ZS_TEMPLATES, load_icons
from .medical import aal_clean_name, load_medical
from .sheets import ANIMAL_SHEETS, FASHION_SHEETS, SHEET_NOISE, SheetDomain, load_animal_sheets, load_fashion_sheets, make_sheets

__all__ = ["CACHE_VERSION", "INSTALL_HINT", "NOISE", "PairSet", "Suite", "Target", "aal_clean_name",
           "contact_sheet", "load_fashion", "load_general", "load_medical", "SHEET_NOISE", "load_fashion_sheets", "make_sheets",
           "ANIMAL_SHEETS", "FASHION_SHEETS", "SheetDomain", "load_animal_sheets", "ICON_CLASSNAMES", "ICON_NOISE",
           "ICON_ZS_TEMPLATES", "load_icons"]
