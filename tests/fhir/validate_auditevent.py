#!/usr/bin/env python3
"""Validate AuditEvents exported by a PIL node.

Usage: validate_auditevent.py FILE [FILE ...]

Each FILE holds one AuditEvent, a Bundle of AuditEvents, or JSON Lines with one
AuditEvent per line. Every AuditEvent is validated

1. against the FHIR AuditEvent structure with the `fhir.resources` models
   (pinned: fhir.resources==8.3.0, import path `fhir.resources.R4B`). No maintained
   release ships FHIR R4 (4.0.1) models: 6.4.0 was the last, on pydantic 1; 6.5.0 moved
   to R4B and 7.x/8.x default to R5 with R4B as a subpackage. R4B changed no element
   of AuditEvent, so the R4B model checks exactly the R4 structure;
2. against what the models cannot check: the slices and fixed values of IHE BALP
   (Basic Audit Log Patterns) Query / PatientQuery for events claiming them, and for
   every event a profile claim, typed agents and a well-formed patient entity.

Exit status: 0 when all validate, 1 when any does not (errors on stderr), 2 when a
file cannot be read or parsed.
"""

from __future__ import annotations

import base64
import binascii
import json
import sys
from pathlib import Path

try:
    from fhir.resources.R4B.auditevent import AuditEvent
    from fhir.resources.R4B.bundle import Bundle
    from pydantic import ValidationError
except ImportError as err:  # pragma: no cover - depends on the environment
    sys.exit(f"validate_auditevent.py needs fhir.resources==8.3.0 ({err}); see setup-venv.sh")

BALP = "https://profiles.ihe.net/ITI/BALP/StructureDefinition/IHE.BasicAudit."
PATIENT_QUERY = BALP + "PatientQuery"
QUERY = BALP + "Query"

DCM = "http://dicom.nema.org/resources/ontology/DCM"
AUDIT_EVENT_TYPE = "http://terminology.hl7.org/CodeSystem/audit-event-type"
RESTFUL_INTERACTION = "http://hl7.org/fhir/restful-interaction"
PARTICIPATION_TYPE = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
BALP_ENTITY_TYPE = "https://profiles.ihe.net/ITI/BALP/CodeSystem/BasicAuditEntityType"
SEARCHES = {"search", "search-type", "search-system"}
# Required bindings of R4 AuditEvent, which the models take as plain codes.
ACTIONS = {"C", "R", "U", "D", "E"}
OUTCOMES = {"0", "4", "8", "12"}
NETWORK_TYPES = {"1", "2", "3", "4", "5"}
# Boolean elements that the models would also accept as "yes", 1, ...
BOOLEANS = {"requestor", "userSelected", "valueBoolean"}


class InputError(Exception):
    """A file that cannot be read as JSON or JSON Lines."""


def load(path: Path) -> list[tuple[str, object]]:
    """The AuditEvents in a file, each with a label saying where it was."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise InputError(f"{path}: {err}") from err
    try:
        document = json.loads(text)
    except json.JSONDecodeError as whole_err:
        lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
        if len(lines) < 2:
            raise InputError(f"{path}: not JSON: {whole_err}") from whole_err
        resources = []
        for number, line in lines:
            try:
                resources.append((f"{path}:{number}", json.loads(line)))
            except json.JSONDecodeError as err:
                raise InputError(f"{path}:{number}: not JSON: {err}") from err
        return resources
    if isinstance(document, dict) and document.get("resourceType") == "Bundle":
        try:
            Bundle.model_validate(document)
        except ValidationError as err:
            raise InputError(f"{path}: invalid Bundle: {err}") from err
        entries = document.get("entry") or []
        return [(f"{path}: entry[{i}]", e.get("resource")) for i, e in enumerate(entries)]
    return [(str(path), document)]


def codings(concept: object) -> list[dict]:
    if isinstance(concept, dict):
        return [c for c in concept.get("coding") or [] if isinstance(c, dict)]
    return []


def is_coding(coding: object, system: str, code: str) -> bool:
    return isinstance(coding, dict) and coding.get("system") == system and coding.get("code") == code


def agents_of(event: dict, system: str, code: str) -> list[dict]:
    return [
        a for a in event.get("agent") or []
        if any(is_coding(c, system, code) for c in codings(a.get("type")))
    ]


def entities_of(event: dict, system: str, code: str) -> list[dict]:
    return [e for e in event.get("entity") or [] if is_coding(e.get("type"), system, code)]


def has_value(element: object) -> bool:
    """Present, with a value or at least an extension (e.g. data-absent-reason)."""
    return isinstance(element, dict) and bool(element)


def non_boolean(element: object, path: str = "") -> list[str]:
    """Paths of boolean elements whose JSON value is not true or false."""
    found = []
    if isinstance(element, dict):
        for key, value in element.items():
            if key in BOOLEANS and not isinstance(value, bool):
                found.append(f"{path}{key}")
            found += non_boolean(value, f"{path}{key}.")
    elif isinstance(element, list):
        for i, value in enumerate(element):
            found += non_boolean(value, f"{path[:-1]}[{i}].")
    return found


def general_problems(event: dict) -> list[str]:
    problems = [f"{path} must be a JSON boolean" for path in non_boolean(event)]
    if event.get("action") is not None and event["action"] not in ACTIONS:
        problems.append(f"action {event['action']!r} is not one of {sorted(ACTIONS)}")
    if event.get("outcome") is not None and event["outcome"] not in OUTCOMES:
        problems.append(f"outcome {event['outcome']!r} is not one of 0, 4, 8, 12")
    profiles = set((event.get("meta") or {}).get("profile") or [])
    if not profiles:
        problems.append("meta.profile is missing")
    for i, agent in enumerate(event.get("agent") or []):
        if not codings(agent.get("type")):
            problems.append(f"agent[{i}] has no type")
        network_type = (agent.get("network") or {}).get("type")
        if network_type is not None and network_type not in NETWORK_TYPES:
            problems.append(f"agent[{i}].network.type {network_type!r} is not one of 1-5")
    for i, entity in enumerate(event.get("entity") or []):
        patient_type = is_coding(entity.get("type"), ENTITY_TYPE, "1")
        patient_role = is_coding(entity.get("role"), OBJECT_ROLE, "1")
        if patient_type != patient_role:
            problems.append(f"entity[{i}]: a patient entity needs type Person (1) and role Patient (1)")
        if patient_role:
            identifier = (entity.get("what") or {}).get("identifier") or {}
            if not (identifier.get("system") and identifier.get("value")):
                problems.append(f"entity[{i}]: patient without what.identifier system and value")
        if entity.get("name") is not None and entity.get("query") is not None:
            problems.append(f"entity[{i}]: sev-1, name and query both present")
    is_query = is_coding(event.get("type"), AUDIT_EVENT_TYPE, "rest") and any(
        c.get("system") == RESTFUL_INTERACTION and c.get("code") in SEARCHES
        for c in event.get("subtype") or [] if isinstance(c, dict)
    )
    if is_query:
        for code, name in (("110153", "client (Source Role ID)"), ("110152", "server (Destination Role ID)")):
            if len(agents_of(event, DCM, code)) != 1:
                problems.append(f"query: needs exactly one {name} agent")
        if event.get("outcome") == "0" and not {PATIENT_QUERY, QUERY} & profiles:
            problems.append("query: a successful query must claim BALP Query or PatientQuery")
    return problems


def balp_query_problems(event: dict, patient: bool) -> list[str]:
    """IHE.BasicAudit.Query, and PatientQuery when `patient`."""
    problems = []
    if not is_coding(event.get("type"), AUDIT_EVENT_TYPE, "rest"):
        problems.append("BALP: type must be audit-event-type#rest")
    searches = [
        c for c in event.get("subtype") or []
        if isinstance(c, dict) and c.get("system") == RESTFUL_INTERACTION and c.get("code") in SEARCHES
    ]
    if len(searches) != 1:
        problems.append("BALP: subtype needs exactly one restful-interaction search code")
    if event.get("action") != "E":
        problems.append("BALP: action must be E")
    if event.get("outcome") != "0":
        problems.append("BALP: outcome must be 0 (failures do not claim this profile)")
    if not event.get("recorded"):
        problems.append("BALP: recorded is required")
    if len(event.get("agent") or []) < 2:
        problems.append("BALP: at least two agents")
    for code, slice_name in (("110153", "client"), ("110152", "server")):
        found = agents_of(event, DCM, code)
        if len(found) != 1:
            problems.append(f"BALP: agent[{slice_name}] 1..1 (DCM#{code})")
            continue
        agent = found[0]
        if not has_value(agent.get("who")):
            problems.append(f"BALP: agent[{slice_name}].who 1..1")
        if not has_value(agent.get("network")):
            problems.append(f"BALP: agent[{slice_name}].network 1..1")
        if agent.get("media") is not None:
            problems.append(f"BALP: agent[{slice_name}].media 0..0")
    users = agents_of(event, PARTICIPATION_TYPE, "IRCP")
    if len(users) > 1:
        problems.append("BALP: agent[user] 0..1")
    for user in users:
        if not has_value(user.get("who")):
            problems.append("BALP: agent[user].who 1..1")
        if user.get("requestor") is not True:
            problems.append("BALP: agent[user].requestor must be true")
        if user.get("network") is not None or user.get("media") is not None:
            problems.append("BALP: agent[user].network and .media 0..0")
    queries = entities_of(event, ENTITY_TYPE, "2")
    if len(queries) != 1:
        problems.append("BALP: entity[query] 1..1 (audit-entity-type#2)")
    for query in queries:
        if not is_coding(query.get("role"), OBJECT_ROLE, "24"):
            problems.append("BALP: entity[query].role must be object-role#24")
        for absent in ("what", "lifecycle", "detail"):
            if query.get(absent) is not None:
                problems.append(f"BALP: entity[query].{absent} 0..0")
        try:
            base64.b64decode(query.get("query") or "", validate=True)
            if not query.get("query"):
                problems.append("BALP: entity[query].query 1..1")
        except (binascii.Error, ValueError):
            problems.append("BALP: entity[query].query is not base64")
    transactions = entities_of(event, BALP_ENTITY_TYPE, "XrequestId")
    if len(transactions) > 1:
        problems.append("BALP: entity[transaction] 0..1")
    for transaction in transactions:
        if not ((transaction.get("what") or {}).get("identifier") or {}).get("value"):
            problems.append("BALP: entity[transaction].what.identifier.value 1..1")
    if patient:
        patients = entities_of(event, ENTITY_TYPE, "1")
        if len(patients) != 1:
            problems.append("BALP: entity[patient] 1..1 (audit-entity-type#1)")
        for entity in patients:
            if not is_coding(entity.get("role"), OBJECT_ROLE, "1"):
                problems.append("BALP: entity[patient].role must be object-role#1")
            what = entity.get("what")
            if not has_value(what):
                problems.append("BALP: entity[patient].what 1..1")
            elif what.get("type", "Patient") != "Patient" or (
                what.get("reference") and not str(what["reference"]).startswith("Patient/")
            ):
                problems.append("BALP: entity[patient].what only Reference(Patient)")
    return problems


def validate(label: str, resource: object) -> list[str]:
    if not isinstance(resource, dict):
        return [f"{label}: not a JSON object"]
    if resource.get("resourceType") != "AuditEvent":
        return [f"{label}: resourceType is {resource.get('resourceType')!r}, not 'AuditEvent'"]
    where = f"{label} (AuditEvent/{resource.get('id', '?')})"
    try:
        AuditEvent.model_validate(resource, strict=True)
    except ValidationError as err:
        return [f"{where}: FHIR AuditEvent structure:\n{err}"]
    problems = general_problems(resource)
    profiles = set((resource.get("meta") or {}).get("profile") or [])
    if PATIENT_QUERY in profiles:
        problems += balp_query_problems(resource, patient=True)
    elif QUERY in profiles:
        problems += balp_query_problems(resource, patient=False)
    return [f"{where}: {p}" for p in problems]


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[1] in ("-h", "--help"):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    count = 0
    errors: list[str] = []
    for name in argv[1:]:
        try:
            resources = load(Path(name))
        except InputError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        for label, resource in resources:
            problems = validate(label, resource)
            errors += problems
            count += not problems
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    if errors:
        print(f"{count} AuditEvent(s) valid, {len(errors)} problem(s)", file=sys.stderr)
        return 1
    if count == 0:
        print("error: no AuditEvent found", file=sys.stderr)
        return 1
    print(f"{count} AuditEvent(s) validated (FHIR R4 AuditEvent structure, BALP checks)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
