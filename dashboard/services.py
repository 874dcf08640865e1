"""Thin glue between dashboard pages and the core: config, per-session chart loading, cached models and stores."""

from __future__ import annotations

import functools
import gc
import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import streamlit as st

from assistant import pipeline
from assistant.audit import report
from assistant.cli import default_anchor
from assistant.clock import demo_anchor
from assistant.logsetup import install_phi_filter
from assistant.model import Chart, Finding
from assistant.security.access_log import AccessLog, AccessLogError, ChainStatus
from assistant.security.gate import Gate, config_error, resolve_gate
from assistant.security.roles import AccessDenied, User, load_role_file, visible_wards
from assistant.security.signin import AuthConfig, SignInConfigError, read_auth_config
from assistant.settings import SettingsError, load_settings, redacted, secrets_file
from assistant.settings import data_dir as settings_data_dir
from assistant.views import (  # noqa: F401 - re-exported: pages and tests name them from here
    MarEvent,
    News2Point,
    PatientDelta,
    PatientView,
    WardDelta,
    WardView,
    bed_sort_key,
    chart_code_status,
    hold_map,
    sort_by_acuity,
)
from assistant.views import mar_events as views_mar_events
from assistant.views import pending_results as views_pending_results

log = logging.getLogger(__name__)
install_phi_filter()  # streamlit sets up its own logging: the dashboard's records pass the same PHI filter

DEMO_DIRNAME = "demo-ward"
DEMO_WARD_REF = "Location/ward-4b"
SEVERITIES = ("high", "medium", "low")
_DEMO_LOCK = threading.Lock()
_FROZEN = threading.Event()
_FREEZE_LOCK = threading.Lock()


def settle_process() -> None:
    """Once per server process, before any chart is read: load the non-patient resources every page needs (rule
    catalogue, connectors) and move every object alive so far out of the cyclic GC's reach (gc.freeze).

    Why: a census builds ~23 charts per session, which triggers a full collection during the run; without this it
    walks every module object (pandas, altair, streamlit) each time, 0.3-1 s on 2 shared cores (issue 15 census
    budget). app.py calls this before the first page runs, so what is frozen is modules and catalogues; nothing is
    shared between sessions by it (frozen objects are still freed by reference counting)."""
    if _FROZEN.is_set():
        return
    with _FREEZE_LOCK:
        if _FROZEN.is_set():
            return
        import connectors  # noqa: F401 - imported here so its module objects are frozen too
        from assistant.rules.engine import default_catalogue

        default_catalogue()
        gc.collect()
        gc.freeze()
        _FROZEN.set()


# --- who is using the app ------------------------------------------------------------------------------
def secrets_files() -> list[str]:
    """Every secrets file that may hold [auth] or NVA_* keys: streamlit's own list and NVA_SECRETS_FILE."""
    files = [str(p) for p in (st.get_option("secrets.files") or [])]
    return files + [str(secrets_file())]


def auth_config() -> AuthConfig:
    """The sign-in configuration; raises SignInConfigError when a secrets file or [auth] is unreadable or invalid."""
    return read_auth_config(secrets_files())


def auth_section() -> dict[str, Any]:
    """The [auth] section (identity provider), or {} when no secrets file has one at all."""
    return auth_config().section


def auth_configured() -> bool:
    return auth_config().configured


def auth_providers() -> list[str | None]:
    """Named providers ([auth.<name>] sections) to offer, or [None] for the single provider in [auth] itself."""
    return list(auth_config().providers) or [None]


class RoleFileError(RuntimeError):
    """NVA_AUTH_ROLE_FILE is set but cannot be read; nobody is let in on a guess."""


@functools.lru_cache(maxsize=4)
def _role_file(path: str, mtime: float) -> dict[str, dict[str, Any]]:
    return load_role_file(path)


def role_file(values: dict[str, str]) -> dict[str, dict[str, Any]] | None:
    path = (values.get("NVA_AUTH_ROLE_FILE") or "").strip()
    if not path:
        return None
    try:
        return _role_file(path, Path(path).stat().st_mtime)
    except (OSError, ValueError) as exc:
        raise RoleFileError(
            f"the role file NVA_AUTH_ROLE_FILE={path} cannot be read ({exc}); fix it or unset it"
        ) from exc


def gate() -> Gate:
    """This run's user: signed in with a role, refused, or the local demo (loopback only)."""
    try:  # fail closed: an unreadable or invalid configuration lets nobody in, demo mode included
        values = load_settings()
        configured = auth_configured()
        roles = role_file(values) if configured else None
    except (SettingsError, SignInConfigError, RoleFileError) as exc:
        return config_error(exc)
    return resolve_gate(
        auth_configured=configured,
        server_address=st.get_option("server.address"),
        claims=st.user.to_dict() if configured else None,
        role_claim=(values.get("NVA_AUTH_ROLE_CLAIM") or "nva_role").strip(),
        ward_claim=(values.get("NVA_AUTH_WARD_CLAIM") or "nva_wards").strip(),
        role_file=roles,
    )


def current_user() -> User:
    """The user the app let in (app.py has gated the run); pages ask it what they may show."""
    g = gate()
    if g.user is None:
        raise AccessDenied(g.message or "not signed in")
    return g.user


def forget_other_user(user: User) -> None:
    """A different identity in the same browser session starts clean: no charts or log marks carried over."""
    ss = st.session_state
    if ss.get("_nva_who") != (user.subject, user.name, user.role):  # identity = iss + sub
        refresh()
        ss.pop("_nva_logged", None)
        ss["_nva_who"] = (user.subject, user.name, user.role)


# --- access audit log ------------------------------------------------------------------------------------
def access_log_path(cfg: AppConfig) -> Path:
    configured = (cfg.settings.get("NVA_ACCESS_LOG") or "").strip()
    return Path(configured) if configured else cfg.data_dir / "access_log.sqlite"


@st.cache_resource(show_spinner=False)
def _access_log(path: str, key: str) -> AccessLog:
    return AccessLog(path, key=key or None)  # the hash chain is verified on open (status logged if broken)


def access_log(cfg: AppConfig) -> AccessLog:
    path = access_log_path(cfg)
    try:
        return _access_log(str(path), cfg.settings.get("NVA_ACCESS_LOG_KEY") or "")
    except (OSError, sqlite3.Error) as exc:
        raise AccessLogError(f"cannot open the access log at {path}: {exc}") from exc


def access_log_status(cfg: AppConfig) -> ChainStatus:
    """The hash-chain check for the access-log page's banner (a log that cannot be opened is broken too)."""
    try:
        return access_log(cfg).verify()
    except AccessLogError as exc:
        return ChainStatus(False, 0, (str(exc),))


def record_access(
    cfg: AppConfig, user: User, action: str, target: str, detail: str = "", *, once: bool = False
) -> None:
    """Write one access event (references only). `once`: at most once per session for this action and target.

    Raises AccessLogError: the caller must not go ahead with what it was about to show.
    """
    done = st.session_state.setdefault("_nva_logged", set())
    key = (action, target)
    if once and key in done:
        return
    access_log(cfg).record(
        user=user.name, role=user.role, action=action, target=target, detail=detail, subject=user.subject
    )
    done.add(key)


def exporter(cfg: AppConfig, user: User, target: str, detail: str, make: Any) -> Any:
    """A deferred download callable that logs the export before it builds the file (no log, no file)."""
    log_ = access_log(cfg)

    def build() -> Any:
        log_.record(
            user=user.name,
            role=user.role,
            action="handoff-export",
            target=target,
            detail=detail,
            subject=user.subject,
        )
        return make()

    return build


# --- configuration -------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class AppConfig:
    source: str
    is_demo: bool
    anchor: datetime | None
    data_dir: Path
    llm_backend: str
    settings: dict[str, str]
    setup_error: str | None = None

    @property
    def source_kind(self) -> str:
        if self.source.startswith(("http://", "https://")):
            return "FHIR REST server"
        path = Path(self.source)
        if path.is_dir() and any(p.name.endswith((".ndjson", ".ndjson.gz")) for p in path.iterdir()):
            return "NDJSON directory"
        return "demo ward (bundle directory)" if self.is_demo else "bundle directory"

    def rules_now(self) -> datetime:
        """The 'now' rules judge against: the demo ward's anchor, so its scenarios stay current; else wall clock."""
        return self.anchor if self.anchor is not None else datetime.now(UTC)

    @property
    def now_reason(self) -> str:
        if self.anchor is not None:
            return f"demo ward anchor ({self.anchor.isoformat(timespec='minutes')}) from ward.json"
        return "wall clock (UTC)"

    def redacted_settings(self) -> dict[str, str]:
        return redacted(self.settings)


def ensure_demo_ward(outdir: Path) -> None:
    """Generate the demo ward the first time the app starts without NVA_SOURCE."""
    with _DEMO_LOCK:
        if outdir.is_dir() and any(outdir.iterdir()):
            return
        from assistant.demo_ward import generate_demo_ward

        outdir.mkdir(parents=True, exist_ok=True)
        log.info("generating the demo ward in %s", outdir)
        generate_demo_ward(outdir, anchor=default_anchor(), seed=7)


def app_config() -> AppConfig:
    values = load_settings()
    # The default `var` is under the repository whatever the working directory, as for the guideline store.
    data_dir = settings_data_dir(values)
    spec = (values.get("NVA_SOURCE") or "").strip()
    error = None
    if not spec:
        demo = data_dir / DEMO_DIRNAME
        spec = str(demo)
        try:
            ensure_demo_ward(demo)
        except Exception as exc:  # noqa: BLE001 - shown on every page so the operator can fix it
            log.exception("demo ward generation failed")
            error = f"the demo ward could not be generated in {demo} ({type(exc).__name__}: {exc})"
    anchor = demo_anchor(spec)
    return AppConfig(
        source=spec,
        is_demo=anchor is not None,
        anchor=anchor,
        data_dir=data_dir,
        llm_backend=(values.get("NVA_LLM_BACKEND") or "none").strip().lower(),
        settings=values,
        setup_error=error,
    )


# --- the chart source, one per session ---------------------------------------------------------------
def session_source(cfg: AppConfig):
    """This session's FhirSource. Kept in session_state (never shared): its index names patients."""
    ss = st.session_state
    if ss.get("_nva_source_spec") != cfg.source or ss.get("_nva_source") is None:
        from connectors import open_source

        old = ss.get("_nva_source")
        if old is not None:
            old.close()
        ss["_nva_source"] = open_source(cfg.source)
        ss["_nva_source_spec"] = cfg.source
    return ss["_nva_source"]


def source_file_errors(source: Any) -> list[tuple[str, str]]:
    """Files a directory source skipped, as (file, reason); the demo ward's own metadata is never among them."""
    return [
        (str(getattr(err, "path", "") or "file"), str(getattr(err, "reason", "") or err))
        for err in getattr(source, "file_errors", []) or []
    ]


# --- per-patient view model (assistant.views, built by assistant.pipeline; pages only lay it out) -----------
def load_patient(source: Any, patient_id: str, now: datetime) -> PatientView:
    """Chart, flags and NEWS2 of one patient. Facts first: nothing here waits for an LLM or an embedding model."""
    return pipeline.load_patient_view(source, patient_id, now)


def _views() -> dict[str, PatientView]:
    return st.session_state.setdefault("_nva_views", {})


def patient_view(cfg: AppConfig, patient_id: str) -> PatientView:
    """This session's view of a patient, loaded once until the user presses refresh."""
    views = _views()
    view = views.get(patient_id)
    if view is None:
        view = load_patient(session_source(cfg), patient_id, cfg.rules_now())
        views[patient_id] = view
    return view


def refresh() -> None:
    """Forget this session's charts and re-read the source (the next render reloads)."""
    for key in ("_nva_views", "_nva_census", "_nva_summaries", "_nva_handoffs"):
        st.session_state.pop(key, None)
    src = st.session_state.pop("_nva_source", None)
    st.session_state.pop("_nva_source_spec", None)
    if src is not None:
        src.close()


@dataclass(frozen=True, slots=True)
class WardChoice:
    ref: str
    name: str


def ward_choices(cfg: AppConfig, user: User | None = None) -> list[WardChoice]:
    """The source's wards; with a user, only those the user may open."""
    wards = [WardChoice(w.ref, w.name) for w in session_source(cfg).wards()]
    if user is None:
        return wards
    allowed = set(visible_wards(user, [w.ref for w in wards]))
    return [w for w in wards if w.ref in allowed]


def ward_name(cfg: AppConfig, ward_ref: str | None) -> str | None:
    return next((w.name for w in ward_choices(cfg) if w.ref == ward_ref), ward_ref)


def patient_ward(cfg: AppConfig, user: User, patient_id: str) -> str | None:
    """The user's ward this patient is on (census), or None: the question is asked before the chart is opened."""
    for w in ward_choices(cfg, user):
        if any(e.patient_id == patient_id for e in ward_census(cfg, w.ref)):
            return w.ref
    return None


def ward_census(cfg: AppConfig, ward_ref: str | None) -> list[Any]:
    cache = st.session_state.setdefault("_nva_census", {})
    key = ward_ref or "*"
    if key not in cache:
        entries = session_source(cfg).ward_census(ward_ref)
        seen: set[str] = set()
        cache[key] = [e for e in entries if not (e.patient_id in seen or seen.add(e.patient_id))]
    return cache[key]


def ward_views(cfg: AppConfig, ward_ref: str | None) -> list[PatientView]:
    return [patient_view(cfg, e.patient_id) for e in ward_census(cfg, ward_ref)]


def ward_view(cfg: AppConfig, ward_ref: str | None, since: datetime | None = None) -> WardView:
    """The census (acuity order) and the shift delta of a ward, from this session's patient views."""
    return pipeline.ward_view(
        session_source(cfg),
        ward_ref,
        cfg.rules_now(),
        ward_name=ward_name(cfg, ward_ref),
        since=since,
        views=ward_views(cfg, ward_ref),
    )


def ward_delta(cfg: AppConfig, ward_ref: str | None, since: datetime | None = None) -> WardDelta:
    """What changed on the ward since `since` (default: acuity.toml's 12 h before the rules' now), sickest first."""
    view = ward_view(cfg, ward_ref, since)
    assert view.delta is not None
    return view.delta


def patient_delta(view: PatientView, since: datetime | None = None) -> PatientDelta | None:
    """One patient's changes since a time the nurse picks (default 12 h)."""
    return pipeline.patient_delta(view, since)


def acuity_key(view: PatientView) -> tuple:
    """Sickest first (assistant/data/acuity.toml)."""
    return view.acuity.key if view.acuity is not None else (0,)


def bed_label(view: PatientView) -> str:
    if view.header is not None:
        return view.header.bed
    enc = view.chart.encounter if view.chart else None
    return (enc.bed_name or enc.bed_ref or "") if enc else ""


def patient_label(view: PatientView) -> str:
    if view.chart is None:
        return f"Patient/{view.patient_id} (not loaded)"
    bed = bed_label(view)
    return f"{bed + ' · ' if bed else ''}{view.chart.patient.name}"


# --- facts derived for display (kept for pages not yet on PatientView.header) -----------------------------
def age_of(chart: Chart, now: datetime) -> int | None:
    return chart.patient.age_on(now.date())


def code_status(chart: Chart) -> tuple[str, str] | None:
    """(status, ref) of the chart's code status (assistant.views.chart_code_status: LOINC 100822-6)."""
    found = chart_code_status(chart)
    return (found.text, found.ref) if found else None


def mar_events(chart: Chart, now: datetime) -> list[MarEvent]:
    """The MAR around `now` with HOLD marks (assistant.views.mar_events, holds from the pipeline's flags)."""
    holds = hold_map(chart, pipeline.findings_for(chart, now))
    return views_mar_events(chart, now, holds=holds)


def pending_items(view: PatientView) -> list[str]:
    """What the next shift must not miss (assistant.views.pending_items: one pending window, HOLD marks)."""
    return [p.text for p in view.pending]


def pending_results(view: PatientView) -> list[str]:
    return [p.text for p in views_pending_results(view.chart)] if view.chart is not None else []


# --- cached models and stores (shared across sessions; no patient data) -------------------------------
@st.cache_resource(show_spinner=False)
def llm_backend(backend: str, settings_items: tuple[tuple[str, str], ...]) -> Any:
    from assistant.llm import LlmSettings, make_backend

    env = dict(settings_items)
    env["NVA_LLM_BACKEND"] = backend
    return make_backend(LlmSettings.from_env(env))


def get_llm(cfg: AppConfig) -> Any:
    keys = tuple(sorted((k, v) for k, v in cfg.settings.items() if k.startswith("NVA_LLM_")))
    return llm_backend(cfg.llm_backend, keys)


@st.cache_resource(show_spinner=False)
def guideline_store() -> Any:
    from guidelines.store import open_store

    return open_store()


@st.cache_resource(show_spinner=False)
def guideline_retriever() -> Any:
    from guidelines.embedding import get_embedder
    from guidelines.retrieval import GuidelineRetriever

    return GuidelineRetriever(guideline_store(), get_embedder())


@dataclass(slots=True)
class Passage:
    citation: str
    title: str
    section_path: str
    text: str


def guideline_passages(finding: Finding, k: int = 1) -> tuple[list[Passage], str | None]:
    """The guideline passage(s) linked to a flag, by the pipeline's one query policy."""
    try:
        store = guideline_store()
        if store.count() == 0:
            return [], "the guideline store is empty (run `nva guidelines ingest guidelines/corpus`)"
        hits = pipeline.passages_for_finding(guideline_retriever(), finding, k)
    except Exception as exc:  # noqa: BLE001 - guidance is helpful, never required to show a flag
        log.warning("guideline lookup failed: %s", type(exc).__name__)
        return [], f"guideline passages unavailable ({type(exc).__name__})"
    return [Passage(h.citation, h.title, h.section_path, h.text) for h in hits], None


def guideline_status() -> dict[str, Any]:
    try:
        stats = guideline_store().stats()
    except Exception as exc:  # noqa: BLE001
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    last = datetime.fromtimestamp(stats.last_ingest, UTC) if stats.last_ingest else None
    return {"ok": True, "documents": stats.documents, "chunks": stats.chunks, "last_ingest": last}


def source_health(cfg: AppConfig) -> dict[str, Any]:
    t0 = time.perf_counter()
    try:
        source = session_source(cfg)
        wards = source.wards()
        patients = sum(1 for _ in source.iter_patient_ids())
    except Exception as exc:  # noqa: BLE001 - the status page reports, it does not crash
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}", "seconds": time.perf_counter() - t0}
    return {
        "ok": True,
        "wards": len(wards),
        "patients": patients,
        "file_errors": source_file_errors(source),
        "seconds": time.perf_counter() - t0,
        "description": getattr(source, "description", cfg.source),
    }


# --- summaries and handoff (assistant.pipeline: the same composition as `nva summarize` / `nva handoff`) ---
def summary_news2(view: PatientView) -> Any | None:
    """The NEWS2 aggregate in the shape the fact sheet takes, with its missing parameters."""
    return pipeline.summary_news2(view)


def compose_summary_stream(
    cfg: AppConfig | None, view: PatientView, passages: list[Passage] | None = None, *, use_llm: bool = True
) -> Any:
    """A SummaryStream of displayed sentences (assistant.summary.composer); `.result` once exhausted.

    The guideline passages are chosen by the pipeline's one policy (as `nva summarize --guidelines`), whatever
    `passages` the page collected for its flag boxes: the argument is kept for callers and not used.
    """
    backend = get_llm(cfg) if (use_llm and cfg is not None) else None
    return pipeline.summary_stream(
        view, backend, pipeline.guideline_passages(view.findings, summary_retriever())
    )


def summary_retriever() -> Any | None:
    """The guideline retriever when the store holds passages, else None (the summary then has none)."""
    try:
        return guideline_retriever() if guideline_store().count() > 0 else None
    except Exception as exc:  # noqa: BLE001 - guidance is optional; the summary must still be produced
        log.warning("guideline store unavailable: %s", type(exc).__name__)
        return None


IPASS_SECTIONS = (
    ("illness", "I — Illness severity"),
    ("patient", "P — Patient summary"),
    ("action", "A — Action list"),
    ("situation", "S — Situation awareness and contingency"),
)


def handoff_for(view: PatientView) -> Any | None:
    """I-PASS handoff of one patient, as `nva handoff` composes it (template, no LLM wait); cached per session."""
    cache = st.session_state.setdefault("_nva_handoffs", {})
    if view.patient_id in cache:
        return cache[view.patient_id]
    result = None
    if view.chart is not None:
        try:
            result = pipeline.handoff_for(view)
        except Exception as exc:  # noqa: BLE001 - one patient's handoff must not break the ward list
            log.warning("handoff composition failed: %s", type(exc).__name__)
            result = None
    cache[view.patient_id] = result
    return result


def ward_handoff_document(cfg: AppConfig, ward_ref: str | None) -> Any:
    """The ward's I-PASS (assistant.summary.handoff.WardHandoff) exactly as `nva handoff --ward` writes it."""
    return pipeline.ward_handoff(
        ward_views(cfg, ward_ref), ward=ward_name(cfg, ward_ref), now=cfg.rules_now(), compose=handoff_for
    )


def ipass_sections(result: Any) -> list[tuple[str, list[Any]]]:
    """(heading, sentences) in I-PASS order from a summary/handoff result; only shown (verified) sentences."""
    sections = getattr(result, "sections", None)
    if isinstance(sections, dict):  # assistant.summary.handoff.HandoffPatient
        return [(heading, list(sections.get(key, []))) for key, heading in IPASS_SECTIONS]
    sentences = list(getattr(result, "sentences", []) or [])
    out = []
    known = {k for k, _ in IPASS_SECTIONS}
    for key, heading in IPASS_SECTIONS:
        rows = [s for s in sentences if getattr(s, "section", "") == key]
        if key == "patient":
            rows += [s for s in sentences if getattr(s, "section", "") not in known]
        out.append((heading, rows))
    return out


# --- audit (assistant.audit: the runner's per-patient step, report.py's formats) ------------------------------
CSV_FIELDS = report.CSV_FIELDS


def audit_dir(cfg: AppConfig) -> Path:
    return cfg.data_dir / "audit"


def audit_runs(cfg: AppConfig) -> list[Path]:
    root = audit_dir(cfg)
    if not root.is_dir():
        return []
    return sorted(
        (p for p in root.rglob("*.jsonl") if ".work" not in p.parent.name),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )


def read_audit_jsonl(lines: Any) -> tuple[list[dict[str, Any]], int]:
    """Finding rows from an audit JSONL; lines that are not findings are counted (assistant.audit.report)."""
    return report.parse_findings_jsonl(lines)


def catalogue_rule(rule_id: str) -> Any | None:
    """A catalogue entry by id (the source of a `rule:<id>` citation), or None when the catalogue has no such rule."""
    from assistant.rules.engine import default_catalogue

    try:
        return default_catalogue().rule(rule_id)
    except KeyError:
        return None


def audit_run_status(lines: Any) -> dict[str, Any] | None:
    """The run-status record of an incomplete audit run (None when complete): the page's red banner."""
    return report.parse_run_status(lines)


def is_episodes(rows: list[dict[str, Any]]) -> bool:
    """Rows of a retrospective run (episodes with a start) rather than findings at one moment."""
    return bool(rows) and all("start" in r and "end_reason" in r for r in rows)


def audit_csv(rows: list[dict[str, Any]]) -> bytes:
    """The filtered findings (or episodes) as CSV, in the column layout of `nva audit --format csv` (`--period`)."""
    fields = report.EPISODE_FIELDS if is_episodes(rows) else report.CSV_FIELDS
    return report.findings_csv(rows, fields).encode("utf-8")


def run_ward_audit(
    cfg: AppConfig,
    ward_ref: str | None,
    progress: Any = None,
    period: tuple[datetime, datetime] | None = None,
) -> Path:
    """Audit every patient on the ward with the audit runner's per-patient step; writes JSONL under the data dir.
    With `period` (start, end): the retrospective audit (episodes, as `nva audit --period`)."""
    now = cfg.rules_now()
    ids = [e.patient_id for e in ward_census(cfg, ward_ref)]
    rows = pipeline.audit_patients(
        session_source(cfg), ids, now, origin=cfg.source, progress=progress, period=period
    )
    slug = (ward_ref or "all").split("/")[-1]
    kind = "-period" if period is not None else ""
    out = audit_dir(cfg) / f"audit-{slug}{kind}-{datetime.now(UTC):%Y%m%dT%H%M%S}.jsonl"
    status = pipeline.audit_status(rows, session_source(cfg))
    report.write_output(
        lambda: rows,
        out,
        fmt="jsonl",
        now=now.isoformat(),
        source=cfg.source,
        status=status,
        retrospective=period is not None,
    )
    return out


def synthesis_line(result: Any) -> str:
    return str(
        getattr(result, "synthesis", "")
        or "Synthesis by receiver: read back the action list and contingencies; ask questions."
    )


@dataclass(slots=True)
class HandoffRow:
    view: PatientView
    result: Any  # the composed I-PASS (HandoffPatient); None until asked for
    level: str
    pending: list[str]

    @property
    def patient_id(self) -> str:
        return self.view.patient_id

    def handoff(self) -> Any:
        """The I-PASS for this patient, composed on first use (template, no LLM wait)."""
        if self.result is None:
            self.result = handoff_for(self.view)
        return self.result


def illness_severity(view: PatientView) -> str:
    """I-PASS illness severity (stable | watcher | unstable) from the fact sheet's rule, without composing."""
    try:
        return pipeline.illness_severity(view)
    except Exception:  # noqa: BLE001 - the row still shows, without a level
        log.exception("illness severity failed")
        return ""


def ward_handoff(cfg: AppConfig, ward_ref: str | None) -> list[HandoffRow]:
    """The ward in acuity order (the census's and `nva handoff`'s order), one row per patient."""
    return [
        HandoffRow(view, None, illness_severity(view), pending_items(view))
        for view in sort_by_acuity(ward_views(cfg, ward_ref))
    ]


def flag_counts(view: PatientView) -> str:
    counts = {s: sum(1 for f in view.findings if f.severity == s) for s in SEVERITIES}
    return " ".join(f"{n} {s}" for s, n in counts.items() if n) or "none"
