"""Thin glue between dashboard pages and the core: config, per-session chart loading, cached models and stores."""

from __future__ import annotations

import csv
import functools
import importlib
import io
import json
import logging
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import streamlit as st

from assistant.cli import default_anchor
from assistant.clock import demo_anchor
from assistant.model import SEVERITY_ORDER, Chart, Finding
from assistant.security.access_log import AccessLog, AccessLogError, ChainStatus
from assistant.security.gate import Gate, config_error, resolve_gate
from assistant.security.roles import AccessDenied, User, load_role_file, visible_wards
from assistant.security.signin import AuthConfig, SignInConfigError, read_auth_config
from assistant.settings import SettingsError, load_settings, redacted, secrets_file

log = logging.getLogger(__name__)

DEMO_DIRNAME = "demo-ward"
DEMO_WARD_REF = "Location/ward-4b"
SEVERITIES = ("high", "medium", "low")
_DEMO_LOCK = threading.Lock()


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
    data_dir = Path(values.get("NVA_DATA_DIR") or "var")
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


# --- per-patient view model --------------------------------------------------------------------------
@dataclass(slots=True)
class News2Point:
    time: datetime
    score: int
    band: str = ""
    parts: dict[str, int] = field(default_factory=dict)
    refs: tuple[str, ...] = ()
    incomplete: bool = False


@dataclass(slots=True)
class PatientView:
    patient_id: str
    chart: Chart | None
    findings: list[Finding] = field(default_factory=list)
    news2: list[News2Point] = field(default_factory=list)
    error: str | None = None
    notices: list[str] = field(default_factory=list)  # parts of the view that are unavailable, and why
    loaded_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    now: datetime = field(default_factory=lambda: datetime.now(UTC))
    load_s: float = 0.0
    news2_score: Any = None  # assistant.rules.news2.News2Score at `now`

    @property
    def news2_total(self) -> int | None:
        return (
            self.news2_score.total if self.news2_score is not None and self.news2_score.parameters else None
        )

    @property
    def top_severity(self) -> str | None:
        return self.findings[0].severity if self.findings else None

    @property
    def error_issues(self) -> list:
        return [i for i in (self.chart.issues if self.chart else []) if i.severity == "error"]


def _optional(module: str) -> Any | None:
    """A core module written by another contributor, or None while it does not exist yet."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and module.startswith(exc.name):
            return None
        raise


def evaluate_findings(chart: Chart, now: datetime) -> tuple[list[Finding], str | None]:
    engine = _optional("assistant.rules.engine")
    if engine is None:
        return [], "the rules engine is not installed; no flags are computed"
    try:
        findings = list(engine.evaluate(chart, now=now))
    except Exception as exc:  # noqa: BLE001 - one failing rule set must not blank the chart
        log.exception("rules evaluation failed")
        return [], f"flags could not be computed ({type(exc).__name__}); the chart below is complete"
    findings.sort(key=lambda f: f.sort_key)
    return findings, None


def news2_series(
    chart: Chart, now: datetime, *, window: timedelta = timedelta(hours=72), limit: int = 80
) -> tuple[list[News2Point], str | None]:
    """NEWS2 as it stood at each charted vital-sign time in the window (the core scores one moment)."""
    mod = _optional("assistant.rules.news2")
    if mod is None or not callable(getattr(mod, "news2", None)):
        return [], "the NEWS2 calculator is not installed"
    try:
        table = mod.news2_table()
        analytes = {spec["analyte"] for spec in table["parameters"].values() if "analyte" in spec}
        times = sorted(
            {
                r.time
                for r in chart.results
                if r.is_usable
                and r.time is not None
                and (r.analyte in analytes or r.category == "vital-signs")
                and now - window <= r.time <= now
            }
        )
        points = []
        for t in times[-limit:]:
            score = mod.news2(chart, now=t)
            if score.parameters:
                points.append(
                    News2Point(
                        time=t,
                        score=score.total,
                        band=score.band,
                        parts=dict(score.points),
                        refs=tuple(score.evidence),
                        incomplete=bool(score.missing),
                    )
                )
    except Exception as exc:  # noqa: BLE001 - NEWS2 helps, the chart must still show
        log.exception("NEWS2 series failed")
        return [], f"NEWS2 could not be computed ({type(exc).__name__})"
    return points, None


def news2_now(chart: Chart, now: datetime) -> Any | None:
    mod = _optional("assistant.rules.news2")
    if mod is None:
        return None
    try:
        return mod.news2(chart, now=now)
    except Exception:  # noqa: BLE001
        log.exception("NEWS2 failed")
        return None


def load_patient(source: Any, patient_id: str, now: datetime) -> PatientView:
    """Chart, flags and NEWS2 of one patient. Facts first: nothing here waits for an LLM or an embedding model."""
    from connectors.errors import FhirError

    t0 = time.perf_counter()
    try:
        chart = source.patient_chart(patient_id)
    except (FhirError, LookupError, ValueError) as exc:
        return PatientView(
            patient_id, None, error=f"{type(exc).__name__}: {exc}", now=now, load_s=time.perf_counter() - t0
        )
    view = PatientView(patient_id, chart, now=now)
    view.findings, note = evaluate_findings(chart, now)
    if note:
        view.notices.append(note)
    view.news2, note = news2_series(chart, now)
    if note:
        view.notices.append(note)
    view.news2_score = news2_now(chart, now)
    view.load_s = time.perf_counter() - t0
    return view


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


def acuity_key(view: PatientView) -> tuple:
    """Sickest first: NEWS2, then the worst flag, then how many high flags."""
    news = view.news2_total if view.news2_total is not None else -1
    worst = SEVERITY_ORDER.get(view.top_severity or "", 9)
    highs = sum(1 for f in view.findings if f.severity == "high")
    failed = 0 if (view.error or view.error_issues) else 1
    return (failed, -news, worst, -highs, bed_label(view))


def bed_label(view: PatientView) -> str:
    enc = view.chart.encounter if view.chart else None
    return (enc.bed_name or enc.bed_ref or "") if enc else ""


def bed_sort_key(bed: str) -> tuple:
    """Beds in ward order: 'bed 2' before 'bed 10'."""
    import re

    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.findall(r"\d+|\D+", bed))


def patient_label(view: PatientView) -> str:
    if view.chart is None:
        return f"Patient/{view.patient_id} (not loaded)"
    bed = bed_label(view)
    return f"{bed + ' · ' if bed else ''}{view.chart.patient.name}"


# --- facts derived for display ----------------------------------------------------------------------
def age_of(chart: Chart, now: datetime) -> int | None:
    return chart.patient.age_on(now.date())


def code_status(chart: Chart) -> tuple[str, str] | None:
    """(status, ref) when the chart records a code status (resuscitation status observation or flag)."""
    keys = ("code status", "code_status", "resuscitation", "dnr", "dnacpr", "advance directive")
    found = None
    for r in chart.results:
        label = f"{r.analyte} {r.name}".lower()
        if any(k in label for k in keys) and (r.value_text or r.value is not None):
            found = (r.value_text or r.display_value(), r.ref)
    return found


@dataclass(slots=True)
class MarEvent:
    order_ref: str
    order: str
    time: datetime
    state: str  # given | held | due | late
    ref: str | None = None  # the administration, when there is one
    detail: str = ""


def _administration_facts(chart: Chart, now: datetime) -> list[dict[str, Any]]:
    """Due / overdue / not-given doses as the summary's fact sheet sees them (one definition of 'late')."""
    facts = _optional("assistant.summary.facts")
    fn = getattr(facts, "administration_facts", None) if facts else None
    if not callable(fn):
        return []
    try:
        return list(fn(chart, now))
    except Exception:  # noqa: BLE001
        log.exception("administration facts failed")
        return []


def mar_events(
    chart: Chart,
    now: datetime,
    *,
    past: timedelta = timedelta(hours=24),
    ahead: timedelta = timedelta(hours=12),
) -> list[MarEvent]:
    """Doses around `now`: given and held (administrations), late and due (next dose of each scheduled order)."""
    events: list[MarEvent] = []
    orders = {o.ref: o for o in chart.orders}
    lo, hi = now - past, now + ahead
    for a in chart.administrations:
        if a.time is None or not (lo <= a.time <= hi):
            continue
        order = orders.get(a.order_ref or "")
        state = "given" if a.was_given else "held"
        detail = a.status if a.was_given else f"{a.status}{': ' + a.status_reason if a.status_reason else ''}"
        events.append(
            MarEvent(a.order_ref or a.ref, order.text if order else a.text, a.time, state, a.ref, detail)
        )
    for fact in _administration_facts(chart, now):
        if fact.get("severity") not in ("overdue", "due") or not fact.get("time"):
            continue
        order_ref = fact["provenance"][0]
        order = orders.get(order_ref)
        due = fact["time"]
        label = order.text if order else str(fact.get("label", order_ref))
        events.append(
            MarEvent(
                order_ref,
                label,
                due,
                "late" if fact["severity"] == "overdue" else "due",
                None,
                fact.get("text", ""),
            )
        )
        interval = order.timing.interval_hours() if order else None
        if interval:
            step = timedelta(hours=interval)
            nxt = due + step
            for _ in range(200):  # bounded: hourly doses over 12 h is 12
                if nxt > hi or (order and order.end and nxt > order.end):
                    break
                if nxt > now:
                    events.append(
                        MarEvent(order_ref, label, nxt, "due", None, f"scheduled {nxt:%d %b %H:%M}")
                    )
                nxt += step
    events.sort(key=lambda e: (e.time, e.order))
    return events


def pending_items(view: PatientView, *, within: timedelta = timedelta(hours=4)) -> list[str]:
    """What the next shift must not miss: overdue and upcoming doses, doses not given, results still pending."""
    if view.chart is None:
        return []
    items: list[str] = []
    for fact in sorted(_administration_facts(view.chart, view.now), key=lambda f: f.get("priority", 9)):
        when = fact.get("time")
        label = str(fact.get("label", ""))[:60]
        if fact.get("severity") == "overdue":
            items.append(f"OVERDUE {label} (due {when:%d %b %H:%M})")
        elif fact.get("severity") == "due" and when and when <= view.now + within:
            items.append(f"{label} due {when:%H:%M}")
        elif fact.get("severity") == "not-given":
            items.append(f"Not given: {label}")
    items += pending_results(view)
    return items


def pending_results(view: PatientView) -> list[str]:
    if view.chart is None:
        return []
    return [
        f"{r.name} result {r.status}" for r in view.chart.results if r.status in ("registered", "preliminary")
    ]


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
    """The guideline passage(s) linked to a finding: by chunk id when the rule names one, else retrieved."""
    try:
        store = guideline_store()
        if store.count() == 0:
            return [], "the guideline store is empty (run `nva guidelines ingest guidelines/corpus`)"
        query = f"{finding.title}. {finding.action}".strip()
        retriever = guideline_retriever()
        hits = retriever.search(
            query, k=k, rule_ids=[finding.rule_id], doc_ids=list(finding.guideline_ids) or None
        )
        if not hits and finding.guideline_ids:  # linked documents not ingested: best passage from the rest
            hits = retriever.search(query, k=k, rule_ids=[finding.rule_id])
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


# --- summaries and handoff --------------------------------------------------------------------------
def summary_news2(view: PatientView) -> Any | None:
    """The NEWS2 aggregate in the shape the fact sheet takes (assistant.summary.facts.News2)."""
    score = view.news2_score
    facts = _optional("assistant.summary.facts")
    if score is None or not score.parameters or facts is None or not hasattr(facts, "News2"):
        return None
    adapt = getattr(facts, "news2_from_score", None)
    if callable(adapt):
        return adapt(score)
    times = [p.time for p in score.parameters if p.time is not None]
    return facts.News2(
        score=score.total,
        refs=tuple(score.evidence),
        single_param_3=any(p.points >= 3 for p in score.parameters),
        time=max(times) if times else None,
    )


def compose_summary_stream(
    cfg: AppConfig | None, view: PatientView, passages: list[Passage] | None = None, *, use_llm: bool = True
) -> Any:
    """A SummaryStream of displayed sentences (assistant.summary.composer); `.result` once exhausted."""
    composer = _optional("assistant.summary.composer")
    if composer is None:
        raise RuntimeError("the summary composer is not installed")
    backend = get_llm(cfg) if (use_llm and cfg is not None) else None
    return composer.compose_stream(
        view.chart, view.findings, passages or (), backend, now=view.now, news2=summary_news2(view)
    )


IPASS_SECTIONS = (
    ("illness", "I — Illness severity"),
    ("patient", "P — Patient summary"),
    ("action", "A — Action list"),
    ("situation", "S — Situation awareness and contingency"),
)


def handoff_for(view: PatientView) -> Any | None:
    """I-PASS handoff of one patient from the template composer (no LLM wait); cached for this session only."""
    cache = st.session_state.setdefault("_nva_handoffs", {})
    if view.patient_id in cache:
        return cache[view.patient_id]
    result = None
    if view.chart is not None:
        try:
            handoff_mod = _optional("assistant.summary.handoff")
            fn = getattr(handoff_mod, "compose_handoff", None) if handoff_mod else None
            if callable(fn):
                news2 = summary_news2(view)
                result = fn(
                    view.chart,
                    view.findings,
                    (),
                    None,
                    now=view.now,
                    news2=news2 if news2 is not None else "auto",
                )
            else:
                result = compose_summary_stream(None, view, use_llm=False).collect()
        except Exception as exc:  # noqa: BLE001 - one patient's handoff must not break the ward list
            log.warning("handoff composition failed: %s", type(exc).__name__)
            result = None
    cache[view.patient_id] = result
    return result


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


# --- audit ---------------------------------------------------------------------------------------------
CSV_FIELDS = (
    "patient",
    "ward",
    "rule_id",
    "category",
    "severity",
    "title",
    "message",
    "evidence",
    "values",
    "action",
    "guideline_ids",
    "sources",
)


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
    """Finding rows from an audit JSONL (one finding a line, or one patient a line with `findings`); bad lines counted."""
    rows: list[dict[str, Any]] = []
    bad = 0
    for line in lines:
        line = line.decode("utf-8", "replace") if isinstance(line, bytes) else line
        line = line.strip()
        if not line:
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if not isinstance(obj, dict):
            bad += 1
        elif isinstance(obj.get("findings"), list):
            for f in obj["findings"]:
                if isinstance(f, dict):
                    rows.append(_audit_row({**f, "ward": obj.get("ward")}))
        elif "rule_id" in obj:
            rows.append(_audit_row(obj))
        else:
            bad += 1
    return rows, bad


def _audit_row(obj: dict[str, Any]) -> dict[str, Any]:
    row = dict(obj)
    patient = str(row.get("patient") or "")
    if patient and "/" not in patient and ":" not in patient:
        patient = f"Patient/{patient}"
    row["patient"] = patient
    row["ward"] = row.get("ward") or "(no ward)"
    row["severity"] = str(row.get("severity") or "low")
    row["evidence"] = list(row.get("evidence") or [])
    row["values"] = list(row.get("values") or [])
    return row


def audit_csv(rows: list[dict[str, Any]]) -> bytes:
    """The filtered findings as CSV, in the column layout of `nva audit --format csv`."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore")
    writer.writeheader()
    for f in rows:
        values = "; ".join(
            f"{v.get('label')}={v.get('value') or ''}@{v.get('time') or ''} [{v.get('ref')}]"
            for v in f.get("values") or []
            if isinstance(v, dict)
        )
        writer.writerow(
            {
                **f,
                "evidence": " ".join(f.get("evidence") or []),
                "values": values,
                "guideline_ids": " ".join(f.get("guideline_ids") or []),
                "sources": " | ".join(f.get("sources") or []),
            }
        )
    return buf.getvalue().encode("utf-8")


def run_ward_audit(cfg: AppConfig, ward_ref: str | None, progress: Any = None) -> Path:
    """Audit every patient on the ward with the audit runner's per-patient step; writes JSONL under the data dir."""
    from assistant.audit.report import write_output
    from assistant.audit.runner import audit_record
    from assistant.rules.engine import default_catalogue
    from connectors.base import PatientRecord
    from connectors.errors import FhirError

    source = session_source(cfg)
    census = ward_census(cfg, ward_ref)
    now = cfg.rules_now()
    catalogue = default_catalogue()
    rows = []
    for i, entry in enumerate(census):
        try:
            record = source.patient_resources(entry.patient_id)
        except FhirError as exc:
            record = PatientRecord(patient_id=entry.patient_id, error=exc, origin=cfg.source)
        rows.append(audit_record(record, now, catalogue))
        if progress is not None:
            progress(i + 1, len(census))
    slug = (ward_ref or "all").split("/")[-1]
    out = audit_dir(cfg) / f"audit-{slug}-{datetime.now(UTC):%Y%m%dT%H%M%S}.jsonl"
    write_output(lambda: rows, out, fmt="jsonl", now=now.isoformat(), source=cfg.source)
    return out


def synthesis_line(result: Any) -> str:
    return str(
        getattr(result, "synthesis", "")
        or "Synthesis by receiver: read back the action list and contingencies; ask questions."
    )


@dataclass(slots=True)
class HandoffRow:
    view: PatientView
    result: Any  # the composed I-PASS (SummaryResult); None until asked for
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
    facts = _optional("assistant.summary.facts")
    fn = getattr(facts, "illness_severity_fact", None) if facts else None
    if view.chart is None or not callable(fn):
        return ""
    try:
        fact = fn(view.chart, view.findings, summary_news2(view), view.chart.patient.ref)
    except Exception:  # noqa: BLE001
        log.exception("illness severity failed")
        return ""
    return str((fact or {}).get("value") or "")


LEVEL_ORDER = {"unstable": 0, "watcher": 1, "stable": 2}


def ward_handoff(cfg: AppConfig, ward_ref: str | None) -> list[HandoffRow]:
    """The ward sorted by acuity (NEWS2, worst flag, I-PASS illness severity), one row per patient."""
    rows = []
    for view in ward_views(cfg, ward_ref):
        rows.append(HandoffRow(view, None, illness_severity(view), pending_items(view)))
    rows.sort(key=lambda r: (acuity_key(r.view)[0], LEVEL_ORDER.get(r.level, 3), *acuity_key(r.view)[1:]))
    return rows


def flag_counts(view: PatientView) -> str:
    counts = {s: sum(1 for f in view.findings if f.severity == s) for s in SEVERITIES}
    return " ".join(f"{n} {s}" for s, n in counts.items() if n) or "none"
