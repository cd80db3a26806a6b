"""Validation with Great Expectations: row rules to quarantine, batch rules that fail loudly.

Per-row *facts* are computed here in Python (does the image decode, its mode and size, is the
caption valid UTF-8, its length, is the pair a duplicate); the *rules* over those facts are the
Expectation Suites in ``chips_core/expectations/`` — real GX suites, run by GX on a pandas batch.
A row failing a row rule goes to ``quarantine`` with the rule's ``meta.reason`` and a detail
naming the value; rules are in priority order, so a row gets the first reason it fails.
Batch rules (counts reconcile, schema, null rates, unique ids) raise
:class:`BatchValidationError` naming every failing expectation.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterable

import pandas as pd
from PIL import Image

from ..errors import ChipsError
from ..scoring.identity import content_pair_id
from .readers import RawRecord

EXPECTATIONS = Path(__file__).parent / "expectations"


class BatchValidationError(ChipsError):
    """A batch rule failed: the stage stops, and the message names the expectation."""


def _import_gx():
    """great_expectations, imported when first needed (it is slow to import), without usage telemetry."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx

    # GX sets some of its own loggers to INFO ("Created temporary directory ..." for every context)
    for name in [n for n in logging.root.manager.loggerDict if n.split(".")[0] == "great_expectations"]:
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    return gx


def _quiet(ctx):
    """No "Calculating Metrics" progress bars from a GX context (they would fill the CLI's output)."""
    try:
        ctx.variables.progress_bars = {"globally": False, "metric_calculations": False}
    except Exception:  # noqa: BLE001 - cosmetic only
        pass
    return ctx


@lru_cache(maxsize=None)
def _gx():
    """One ephemeral GX context and pandas asset per process (GX is slow to set up)."""
    gx = _import_gx()
    ctx = _quiet(gx.get_context(mode="ephemeral"))
    ds = ctx.data_sources.add_pandas("chips")
    asset = ds.add_dataframe_asset("frame")
    return ctx, asset.add_batch_definition_whole_dataframe("whole")


def load_expectations(name: str):
    """The GX Expectation Suite ``expectations/<name>.json`` (``row_rules`` or ``batch_rules``)."""
    from great_expectations.core.expectation_suite import ExpectationSuite

    return ExpectationSuite(**json.loads((EXPECTATIONS / f"{name}.json").read_text()))


def run_suite(suite, frame: pd.DataFrame):
    _, batch_def = _gx()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batch = batch_def.get_batch(batch_parameters={"dataframe": frame})
        return batch.validate(suite, result_format="COMPLETE")


# ---------------------------------------------------------------------------------------------
# Row facts

@dataclass
class RowFacts:
    read_ok: bool
    caption_utf8: bool
    caption_chars: int
    image_decodes: bool
    image_mode: str | None
    min_side: int
    is_duplicate: bool
    # not checked by rules; carried to the kept row or the detail
    caption: str | None = None
    width: int = 0
    height: int = 0
    image_format: str | None = None
    pair_id: str | None = None
    image_sha256: str | None = None
    image_size: int = 0  # bytes, as read
    detail: dict = field(default_factory=dict)


def _decode_caption(raw) -> tuple[bool, str | None, str]:
    if raw is None:
        return True, "", "no caption"
    if isinstance(raw, bytes):
        try:
            return True, raw.decode("utf-8"), ""
        except UnicodeDecodeError as e:
            return False, None, f"caption is not valid UTF-8: {e}"
    try:
        raw.encode("utf-8")
        return True, raw, ""
    except UnicodeEncodeError as e:
        return False, None, f"caption is not valid UTF-8: {e}"


def _decode_image(data: bytes | None) -> tuple[bool, str | None, int, int, str | None, str]:
    if not data:
        return False, None, 0, 0, None, "no image bytes"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                im.load()  # a full decode: truncated files fail here, not later in training
                return True, im.mode, im.width, im.height, im.format, ""
    except Exception as e:  # noqa: BLE001 - any decoder error is the same verdict for the row
        # without the in-memory file's address ("<_io.BytesIO object at 0x7f…>"): the same bytes, the same detail
        message = re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "the image bytes", str(e))
        return False, None, 0, 0, None, f"{type(e).__name__}: {message}"


def row_facts(rec: RawRecord) -> RowFacts:
    """Facts about one raw record (duplicates are marked later, against the pairs kept so far)."""
    utf8, caption, cap_detail = _decode_caption(rec.caption)
    caption = caption.strip() if caption is not None else None
    ok, mode, w, h, fmt, img_detail = _decode_image(rec.image) if rec.error is None else (False, None, 0, 0, None, "")
    facts = RowFacts(read_ok=rec.error is None, caption_utf8=utf8, caption_chars=len(caption or ""),
                     image_decodes=ok, image_mode=mode, min_side=min(w, h), is_duplicate=False,
                     caption=caption, width=w, height=h, image_format=fmt, image_size=len(rec.image or b""))
    facts.detail = {
        "read_error": rec.error[1] if rec.error else "", "caption_not_utf8": cap_detail,
        "caption_empty": f"caption has {facts.caption_chars} characters after stripping whitespace",
        "caption_too_long": f"caption has {facts.caption_chars} characters",
        "image_undecodable": img_detail, "image_mode_unsupported": f"image mode {mode!r}",
        "image_too_small": f"image is {w}x{h} px",
    }
    if rec.error:
        facts.detail["read_error"] = f"{rec.error[0]}: {rec.error[1]}"
    if ok and utf8 and caption:
        facts.pair_id = content_pair_id(rec.image, caption)
        facts.image_sha256 = hashlib.sha256(rec.image).hexdigest()
    return facts


# ---------------------------------------------------------------------------------------------
# A validated chunk

@dataclass
class Validated:
    pairs: list[dict]
    pair_sources: list[dict]
    quarantine: list[dict]
    read: int

    @property
    def counts(self) -> dict:
        return {"read": self.read, "kept": len(self.pairs), "quarantined": len(self.quarantine)}


ROW_COLUMNS = ("read_ok", "caption_utf8", "caption_chars", "image_decodes", "image_mode", "min_side", "is_duplicate")


def _reasons(facts: list[RowFacts]) -> dict[int, str]:
    """Row index -> the first row rule (in suite order) the row fails."""
    frame = pd.DataFrame({c: [getattr(f, c) for f in facts] for c in ROW_COLUMNS})
    reason_of: dict[int, str] = {}
    for r in run_suite(load_expectations("row_rules"), frame).results:
        for i in r.result.get("unexpected_index_list") or []:
            reason_of.setdefault(int(i), r.expectation_config.meta["reason"])
    return reason_of


@dataclass
class Judged:
    """A chunk of records with each row's facts and its first verdict (:func:`judge_records`): every row rule but
    ``duplicate``, which needs what was kept before (:func:`mark_duplicates`)."""
    records: list[RawRecord]
    facts: list[RowFacts]
    first: dict[int, str]

    def candidates(self) -> list[tuple[int, str, str]]:
        """``(row, pair_id, source_key)`` of the rows that passed every rule but ``duplicate``, in input order:
        what de-duplication decides on."""
        return [(i, f.pair_id, rec.source_key) for i, (rec, f) in enumerate(zip(self.records, self.facts))
                if i not in self.first and f.pair_id is not None]


def judge_records(records: Iterable[RawRecord]) -> Judged:
    """Facts (decode, hash) and the first GX pass over a chunk: the per-row work, which needs no other row."""
    recs = list(records)
    facts = [row_facts(rec) for rec in recs]
    return Judged(recs, facts, _reasons(facts) if recs else {})


def mark_duplicates(candidates: Iterable[tuple[int, str, str]], seen) -> dict[int, str]:
    """Row -> duplicate detail, for the candidates (:meth:`Judged.candidates`, in input order) whose content was
    kept before: by an earlier row, chunk, shard or ingest (``seen``: pair id -> source key of the kept row,
    updated in place). A rejected row never reaches here, so it never shadows a later good copy."""
    duplicates = {}
    for i, pair_id, source_key in candidates:
        if pair_id in seen:
            duplicates[i] = f"same content as pair {pair_id} (first kept from {seen[pair_id]})"
        else:
            seen[pair_id] = source_key
    return duplicates


def verdict(judged: Judged, duplicates: dict[int, str], run_id: str, skip_quarantine=frozenset(),
            skip_sources=frozenset()) -> Validated:
    """The chunk's kept pairs, source rows and quarantine rows, with ``duplicates`` (:func:`mark_duplicates`) marked:
    the second GX pass judges every rule, duplicate included, and is the verdict. Rows in ``skip_quarantine`` /
    ``skip_sources`` were recorded before (a re-ingest): they get no new quarantine / ``pair_sources`` row."""
    out = Validated([], [], [], len(judged.records))
    for i, detail in duplicates.items():
        judged.facts[i].is_duplicate = True
        judged.facts[i].detail["duplicate"] = detail
    reason_of = _reasons(judged.facts) if duplicates else judged.first
    for i, (rec, f) in enumerate(zip(judged.records, judged.facts)):
        reason = reason_of.get(i)
        if reason is None:
            out.pairs.append({"pair_id": f.pair_id, "source": rec.source, "source_key": rec.source_key,
                              "caption": f.caption, "image_uri": rec.image_uri, "image_sha256": f.image_sha256,
                              "image_size": f.image_size, "width": f.width, "height": f.height,
                              "image_format": f.image_format, "image": rec.image, "ingest_run_id": run_id})
        elif i not in skip_quarantine:
            out.quarantine.append({"source": rec.source, "source_key": rec.source_key, "reason": reason,
                                   "detail": f.detail.get(reason, ""), "run_id": run_id})
        if reason in (None, "duplicate") and i not in skip_sources:  # every source key of a kept pair is kept
            out.pair_sources.append({"pair_id": f.pair_id, "source": rec.source, "source_key": rec.source_key,
                                     "ingest_run_id": run_id})
    return out


def validate_records(records: Iterable[RawRecord], run_id: str, seen: dict[str, str] | None = None) -> Validated:
    """Apply the row rules to a chunk of records. ``seen`` (pair id -> source key of the kept row)
    is updated in place, so duplicates within and across chunks and sources are caught.

    Two GX passes: the first judges every rule but ``duplicate`` (:func:`judge_records`); duplicates are then
    marked, in input order, among the rows that passed (:func:`mark_duplicates`); the second pass judges all
    rules, and is the verdict (:func:`verdict`). Ingest on Dask runs the same three steps, the first and last on
    workers and the middle one on the driver, in shard order."""
    judged = judge_records(records)
    seen = {} if seen is None else seen
    return verdict(judged, mark_duplicates(judged.candidates(), seen), run_id)


@lru_cache(maxsize=None)
def _docs_checkpoints(docs_dir: str):
    """A GX context that writes Data Docs under ``docs_dir``, with one checkpoint per batch-rule table."""
    gx = _import_gx()
    from great_expectations.checkpoint import UpdateDataDocsAction
    from great_expectations.core.expectation_suite import ExpectationSuite

    ctx = _quiet(gx.get_context(mode="ephemeral"))
    ctx.add_data_docs_site(site_name="chips", site_config={
        "class_name": "SiteBuilder", "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": docs_dir}})
    asset = ctx.data_sources.add_pandas("chips").add_dataframe_asset("frame")
    batch_def = asset.add_batch_definition_whole_dataframe("whole")
    ctx.suites.add(load_expectations("row_rules"))  # documented on the site, run per chunk by validate_records
    full = load_expectations("batch_rules")
    checkpoints = {}
    for table in ("summary", "pairs"):
        suite = ctx.suites.add(ExpectationSuite(name=f"{full.name}.{table}", expectations=[
            e for e in full.expectations if e.meta.get("table") == table]))
        vd = ctx.validation_definitions.add(gx.ValidationDefinition(name=f"batch_{table}", data=batch_def, suite=suite))
        checkpoints[table] = ctx.checkpoints.add(gx.Checkpoint(
            name=f"chips_batch_{table}", validation_definitions=[vd], result_format={"result_format": "SUMMARY"},
            actions=[UpdateDataDocsAction(name="data_docs", site_names=["chips"])]))
    ctx.build_data_docs(site_names=["chips"])
    return checkpoints


OFFLINE_INDEX = "chips.html"


def write_offline_index(docs_dir: str) -> str | None:
    """``<docs_dir>/chips.html``: every validation and expectation-suite page of the Data Docs, as plain links with
    each validation's status, newest first. GX's own ``index.html`` builds its tables with scripts from CDNs, so
    offline it lists nothing; this page needs no network (the pages it links still ask CDNs for their styles and
    show unstyled, complete, offline). None when no Data Docs were built there."""
    import html
    import re

    root = Path(docs_dir)
    if not (root / "index.html").is_file():
        return None

    def pages(sub: str) -> list[Path]:
        return sorted((root / sub).rglob("*.html")) if (root / sub).is_dir() else []

    status = re.compile(r"Status:\s*(?:<[^>]*>\s*)*(Succeeded|Failed)")
    rows = []
    for page in pages("validations"):
        rel = page.relative_to(root)
        parts = rel.parts  # validations/<suite>/<table>/<batch>/<run time>/<asset>.html
        found = status.search(page.read_text(errors="replace"))
        rows.append((parts[-2], "/".join(parts[1:-3]) or parts[1], found.group(1) if found else "see page", rel))
    rows.sort(key=lambda r: r[0], reverse=True)
    esc = html.escape
    body = ["<!doctype html><html><head><meta charset='utf-8'><title>chips: data validation</title>",
            "<style>body{font-family:sans-serif;margin:2em}td,th{padding:2px 12px;text-align:left}"
            ".Failed{color:#b00}</style></head><body><h1>Data validation (Great Expectations)</h1>",
            "<p>Works offline. GX's own <a href='index.html'>index.html</a> loads its table scripts from CDNs and "
            "lists nothing without network; the pages below load their styles from CDNs too and show unstyled "
            "offline, with every result.</p>",
            f"<h2>Validations ({len(rows)}, newest first)</h2><table><tr><th>run time</th><th>suite</th>"
            "<th>status</th></tr>"]
    body += [f"<tr><td><a href='{esc(str(rel))}'>{esc(when)}</a></td><td>{esc(suite)}</td>"
             f"<td class='{esc(st)}'>{esc(st)}</td></tr>" for when, suite, st, rel in rows]
    body += ["</table><h2>Expectation suites</h2><ul>"]
    body += [f"<li><a href='{esc(str(p.relative_to(root)))}'>{esc(str(p.relative_to(root / 'expectations')))}</a></li>"
             for p in pages("expectations")]
    body += ["</ul></body></html>"]
    out = root / OFFLINE_INDEX
    out.write_text("\n".join(body))
    return str(out)


def check_batch(pairs: pd.DataFrame, read: int, kept: int, quarantined: int, docs_dir: str | None = None) -> None:
    """Batch rules; raise :class:`BatchValidationError` naming every failed expectation.
    With ``docs_dir``, the results are also rendered as GX Data Docs HTML there."""
    from great_expectations.core.expectation_suite import ExpectationSuite

    suite = load_expectations("batch_rules")
    summary = pd.DataFrame({"unreconciled": [read - kept - quarantined]})
    failures = []
    for table, frame in (("summary", summary), ("pairs", pairs)):
        if docs_dir and not frame.empty:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                run = _docs_checkpoints(docs_dir)[table].run(batch_parameters={"dataframe": frame})
            results = [r for v in run.run_results.values() for r in v.results]
        else:
            rules = [e for e in suite.expectations if e.meta.get("table") == table
                     # a null *rate* is undefined on no rows: an empty shard passes those vacuously
                     and not (frame.empty and e.expectation_type == "expect_column_proportion_of_non_null_values_to_be_between")]
            results = run_suite(ExpectationSuite(name=f"{suite.name}.{table}", expectations=rules), frame).results
        for r in results:
            if not r.success:
                cfg = r.expectation_config
                observed = r.result.get("observed_value", r.result.get("unexpected_count"))
                failures.append(f"{cfg.type}({cfg.kwargs.get('column', '')}) [{cfg.meta.get('rule')}] observed {observed!r}")
    if failures:
        raise BatchValidationError(f"batch rules failed (read={read}, kept={kept}, quarantined={quarantined}): "
                                   + "; ".join(failures))
