#!/usr/bin/env python3
"""A small PIL client in Python, written from docs/integration-guide.md and proto/.

Against three running regions (helse-vest, helse-midt, helse-nord, as `pil-node demo`
starts them) it:

1. registers a pointer at helse-vest and another at helse-midt (RegistryService.UpsertPointer),
2. looks the patient up at helse-vest (LookupService.Lookup, with a DPoP-bound access
   token) and checks that both pointers come back and that every region answered OK,
3. runs a bulk sync at helse-nord (RegistryService.SyncPointers: a header, then batches),
4. exports that organization's pointers at helse-nord (RegistryService.ExportPointers)
   and checks that every synced pointer is in the export.

It prints what it does and ends with `OK`, or stops at the first failed check with a
message and a non-zero exit code.

    python pil_example.py --demo-dir DIR

The gRPC stubs are generated from the proto files at run time into a temporary
directory; nothing generated is kept.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import hashlib
import importlib
import json
import secrets
import sys
import tempfile
import time
import tomllib
import uuid
from dataclasses import dataclass
from pathlib import Path

import grpc
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

# --- Vocabulary from the integration guide ---------------------------------------------

SYSTEM_FNR = "urn:oid:2.16.578.1.12.4.1.4.1"  # fødselsnummer (and H-nummer)
SYSTEM_DNR = "urn:oid:2.16.578.1.12.4.1.4.2"  # D-nummer
SYSTEM_FHN = "urn:oid:2.16.578.1.12.4.1.4.3"  # felles hjelpenummer
SYSTEM_HPR = "urn:oid:2.16.578.1.12.4.1.4.4"  # HPR number
SYSTEM_ORGNR = "urn:oid:2.16.578.1.12.4.1.4.101"  # organization number
SYSTEM_PURPOSE_OF_USE = "urn:oid:2.16.840.1.113883.1.11.20448"  # HL7 v3 PurposeOfUse
SYSTEM_HPR_AUTHORIZATION = "urn:oid:2.16.578.1.12.4.1.1.9060"  # kodeverk 9060

CLAIM_ORGNR_PARENT = "helseid://claims/client/claims/orgnr_parent"
CLAIM_HPR_NUMBER = "helseid://claims/hpr/hpr_number"
TILLITSRAMMEVERK_TYPE = "nhn:tillitsrammeverk:parameters"

LOOKUP_PATH = "/pil.v1.LookupService/Lookup"

REGIONS = ("helse-vest", "helse-midt", "helse-nord")

# The demo's organizations (every region has a certificate for each).
HELSE_BERGEN = ("983974724", "Helse Bergen HF")
BERGEN_KOMMUNE = ("964338531", "Bergen kommune")
VEST_DHO = ("914637651", "Vest DHO AS")

# The health professional the demo's profiles name (a doctor, HPR authorization LE).
HPR_NUMBER = "565501872"
PROFESSION = "LE"

CALL_TIMEOUT_S = 10.0


class CheckFailed(Exception):
    """A check of the example failed; the message says which."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def step(text: str) -> None:
    print(f"- {text}", flush=True)


# --- Identifiers ------------------------------------------------------------------------

K1_WEIGHTS = (3, 7, 6, 1, 8, 9, 4, 5, 2)
K2_WEIGHTS = (5, 4, 3, 2, 7, 6, 5, 4, 3, 2)


def org_number_valid(value: str) -> bool:
    """9 ASCII digits, mod-11 check digit (weights 3 2 7 6 5 4 3 2, check digit weight 1)."""
    if len(value) != 9 or not all(c in "0123456789" for c in value):
        return False
    digits = [int(c) for c in value]
    weights = (3, 2, 7, 6, 5, 4, 3, 2, 1)
    return sum(d * w for d, w in zip(digits, weights)) % 11 == 0


def synthetic_fnr() -> str:
    """A random synthetic fødselsnummer (month + 80) with classic check digits.

    Accepted only by nodes with `test_data = true`, such as the demo's.
    """
    while True:
        day = secrets.randbelow(28) + 1
        month = secrets.randbelow(12) + 1 + 80
        year = secrets.randbelow(100)
        individual = secrets.randbelow(1000)
        first9 = [int(c) for c in f"{day:02d}{month:02d}{year:02d}{individual:03d}"]
        k1 = (11 - sum(d * w for d, w in zip(first9, K1_WEIGHTS)) % 11) % 11
        if k1 == 10:
            continue
        k2 = (11 - sum(d * w for d, w in zip(first9 + [k1], K2_WEIGHTS)) % 11) % 11
        if k2 == 10:
            continue
        return "".join(str(d) for d in first9 + [k1, k2])


def patient_id_error(system: str, value: str, allow_synthetic: bool) -> str | None:
    """Why a node would refuse this patient identifier, or None when it accepts it.

    The rules of the integration guide, in the order a node checks them.
    """
    claimed = {SYSTEM_FNR: "fnr", SYSTEM_DNR: "dnr", SYSTEM_FHN: "fhn"}.get(system)
    if claimed is None:
        return "unknown identifier system"
    if len(value) != 11:
        return "not exactly 11 characters"
    if not all(c in "0123456789" for c in value):
        return "not only the digits 0-9"
    d = [int(c) for c in value]
    synthetic = None
    date_error = None
    if d[0] >= 8:
        kind = "fhn"
    else:
        day, month, yy = d[0] * 10 + d[1], d[2] * 10 + d[3], d[4] * 10 + d[5]
        kind = "dnr" if d[0] >= 4 else "fnr"
        if kind == "dnr":
            day -= 40
        if 1 <= month <= 12:
            pass
        elif 41 <= month <= 52 and kind == "fnr":
            kind, month = "hnr", month - 40
        elif 66 <= month <= 77:
            month, synthetic = month - 65, 65
        elif 81 <= month <= 92:
            month, synthetic = month - 80, 80
        else:
            date_error = "month is not 01-12 after removing the offsets"
        if date_error is None:
            leap = yy % 4 == 0
            days = {2: 29 if leap else 28, 4: 30, 6: 30, 9: 30, 11: 30}.get(month, 31)
            if not 1 <= day <= days:
                date_error = "the day does not exist in that month"
    rest1 = (sum(a * b for a, b in zip(d[:9], K1_WEIGHTS)) + d[9]) % 11
    rest2 = (sum(a * b for a, b in zip(d[:10], K2_WEIGHTS)) + d[10]) % 11
    first_ok = rest1 <= 3 if kind in ("fnr", "dnr") else rest1 == 0
    if not (first_ok and rest2 == 0):
        return "invalid check digit"
    system_of_kind = {"fnr": SYSTEM_FNR, "hnr": SYSTEM_FNR, "dnr": SYSTEM_DNR, "fhn": SYSTEM_FHN}
    if system_of_kind[kind] != system:
        return f"a {kind} under another kind's system"
    if date_error:
        return date_error
    if synthetic and not allow_synthetic:
        return "synthetic test identifier on a production node"
    return None


# --- gRPC stubs, generated at run time -----------------------------------------------


def load_stubs(proto_dir: Path, out_dir: Path):
    """Compiles pil/v1/*.proto with grpc_tools.protoc into out_dir and imports them."""
    import grpc_tools
    from grpc_tools import protoc

    files = sorted(p.relative_to(proto_dir).as_posix() for p in (proto_dir / "pil" / "v1").glob("*.proto"))
    check(bool(files), f"no proto files in {proto_dir / 'pil' / 'v1'}")
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{proto_dir}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *files,
    ]
    check(protoc.main(args) == 0, f"protoc failed on {proto_dir}")
    sys.path.insert(0, str(out_dir))
    modules = {}
    for name in ("pointer", "registry", "lookup"):
        modules[name] = importlib.import_module(f"pil.v1.{name}_pb2")
        modules[name + "_grpc"] = importlib.import_module(f"pil.v1.{name}_pb2_grpc")
    return modules


# --- Access tokens and DPoP proofs -----------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class DpopKey:
    """The client's DPoP key (P-256, ES256): the token is bound to its thumbprint."""

    def __init__(self) -> None:
        self.private_key = ec.generate_private_key(ec.SECP256R1())
        numbers = self.private_key.public_key().public_numbers()
        self.jwk = {
            "kty": "EC",
            "crv": "P-256",
            "x": b64url(numbers.x.to_bytes(32, "big")),
            "y": b64url(numbers.y.to_bytes(32, "big")),
        }
        # RFC 7638: the required members in lexicographic order, no whitespace.
        canonical = json.dumps(
            {k: self.jwk[k] for k in ("crv", "kty", "x", "y")}, separators=(",", ":")
        )
        self.thumbprint = b64url(hashlib.sha256(canonical.encode("ascii")).digest())

    def proof(self, htu: str, access_token: str) -> str:
        claims = {
            "jti": str(uuid.uuid4()),
            "htm": "POST",
            "htu": htu,
            "iat": int(time.time()),
            "ath": b64url(hashlib.sha256(access_token.encode("ascii")).digest()),
        }
        return jwt.encode(
            claims,
            self.private_key,
            algorithm="ES256",
            headers={"typ": "dpop+jwt", "jwk": self.jwk},
        )


@dataclass
class Issuer:
    """The development token issuer of a demo region (stands in for HelseID)."""

    iss: str
    audience: str
    scope: str
    kid: str
    algorithm: str
    private_key: object

    @classmethod
    def of_region(cls, region_dir: Path, auth: dict) -> "Issuer":
        jwks = json.loads((region_dir / "issuer" / "jwks.json").read_text())
        key = jwks["keys"][0]
        pem = (region_dir / "issuer" / "issuer-key.pem").read_bytes()
        return cls(
            iss=auth["issuer"],
            audience=auth["audience"],
            scope=auth.get("required_scope", "pil:lookup"),
            kid=key["kid"],
            algorithm=key.get("alg", "ES256"),
            private_key=serialization.load_pem_private_key(pem, password=None),
        )

    def access_token(self, organization: str, dpop: DpopKey, purpose: str = "TREAT") -> str:
        now = int(time.time())
        attest = {
            "type": TILLITSRAMMEVERK_TYPE,
            "practitioner": {
                "hpr_nr": {"id": HPR_NUMBER, "system": SYSTEM_HPR},
                "authorization": {"code": PROFESSION, "system": SYSTEM_HPR_AUTHORIZATION},
                "legal_entity": {"id": organization, "system": SYSTEM_ORGNR},
                "point_of_care": {"id": organization, "system": SYSTEM_ORGNR},
            },
            "care_relationship": {
                "purpose_of_use": {"code": purpose, "system": SYSTEM_PURPOSE_OF_USE},
                # The reference to the record system's documented decision is what
                # asserts the care relationship.
                "decision_ref": {"id": str(uuid.uuid4()), "user_selected": False},
            },
        }
        claims = {
            "iss": self.iss,
            "aud": self.audience,
            "iat": now,
            "nbf": now,
            "exp": now + 300,
            "jti": str(uuid.uuid4()),
            "scope": self.scope,
            "client_id": "pil-python-example",
            CLAIM_ORGNR_PARENT: organization,
            CLAIM_HPR_NUMBER: HPR_NUMBER,
            "cnf": {"jkt": dpop.thumbprint},
            "authorization_details": [attest],
        }
        return jwt.encode(
            claims,
            self.private_key,
            algorithm=self.algorithm,
            headers={"typ": "at+jwt", "kid": self.kid},
        )


# --- Regions and connections -----------------------------------------------------------


@dataclass
class Region:
    name: str
    dir: Path
    port: int
    test_data: bool
    auth: dict

    @classmethod
    def load(cls, demo_dir: Path, name: str) -> "Region":
        region_dir = demo_dir / name
        config_path = region_dir / "node.toml"
        check(config_path.is_file(), f"{config_path} not found: is {demo_dir} a `pil-node demo` directory?")
        config = tomllib.loads(config_path.read_text())
        check(config.get("region") == name, f"{config_path} is for region {config.get('region')!r}, not {name!r}")
        port = int(str(config["listen"]).rsplit(":", 1)[1])
        return cls(name, region_dir, port, bool(config.get("test_data", False)), config["auth"])

    def authority(self, host: str) -> str:
        return f"{host}:{self.port}"


class Connection:
    """One organization's mutual-TLS channel to one region's node."""

    def __init__(self, modules, region: Region, host: str, organization: str) -> None:
        pki = region.dir / "pki"
        credentials = grpc.ssl_channel_credentials(
            root_certificates=(pki / "ca.pem").read_bytes(),
            private_key=(pki / f"org-{organization}-key.pem").read_bytes(),
            certificate_chain=(pki / f"org-{organization}.pem").read_bytes(),
        )
        self.region = region
        self.organization = organization
        # The target's host:port is the call's :authority, and so the DPoP htu's; the
        # host must be a name in the node's certificate (the demo's: localhost,
        # 127.0.0.1, ::1). No ssl_target_name_override: it would change the authority.
        self.authority = region.authority(host)
        self.channel = grpc.secure_channel(
            self.authority,
            credentials,
            options=[
                ("grpc.max_receive_message_length", 64 * 1024 * 1024),
                ("grpc.max_send_message_length", 4 * 1024 * 1024),
            ],
        )
        self.registry = modules["registry_grpc"].RegistryServiceStub(self.channel)
        self.lookup = modules["lookup_grpc"].LookupServiceStub(self.channel)

    def htu(self, method_path: str) -> str:
        return f"https://{self.authority}{method_path}"

    def close(self) -> None:
        self.channel.close()


def grpc_error(what: str, error: grpc.RpcError) -> CheckFailed:
    return CheckFailed(f"{what} failed: {error.code().name}: {error.details()}")


# --- The walk-through ------------------------------------------------------------------


def timestamp(pb_timestamp_cls, when: datetime.datetime):
    t = pb_timestamp_cls()
    t.FromDatetime(when)
    return t


def make_pointer(m, patient: str, org: tuple[str, str], base_url: str, categories: list[str]):
    from google.protobuf.timestamp_pb2 import Timestamp

    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    pb = m["pointer"]
    return pb.Pointer(
        patient=pb.PatientIdentifier(system=SYSTEM_FNR, value=patient),
        holder=pb.Organization(organization_number=org[0], name=org[1]),
        endpoint=pb.Endpoint(base_url=base_url, api_kind=pb.API_KIND_FHIR_R4),
        categories=categories,
        period=pb.Period(start=timestamp(Timestamp, now - datetime.timedelta(days=365))),
        last_updated=timestamp(Timestamp, now),
    )


def upsert(m, conn: Connection, pointer) -> None:
    request = m["registry"].UpsertPointerRequest(pointer=pointer)
    try:
        response = conn.registry.UpsertPointer(request, timeout=CALL_TIMEOUT_S)
    except grpc.RpcError as e:
        raise grpc_error(f"UpsertPointer at {conn.region.name}", e) from e
    outcome = m["registry"].WriteOutcome.Name(response.outcome)
    check(
        outcome in ("WRITE_OUTCOME_INSERTED", "WRITE_OUTCOME_UPDATED", "WRITE_OUTCOME_UNCHANGED"),
        f"UpsertPointer at {conn.region.name}: unexpected outcome {outcome}",
    )
    check(
        response.pointer.region == conn.region.name,
        f"UpsertPointer at {conn.region.name}: stored pointer has region {response.pointer.region!r}",
    )
    check(bool(response.pointer.pointer_id), "UpsertPointer: stored pointer has no pointer_id")
    step(
        f"{conn.region.name}: {pointer.holder.name} registered {pointer.endpoint.base_url} "
        f"({outcome.removeprefix('WRITE_OUTCOME_')}, pointer_id {response.pointer.pointer_id})"
    )


def lookup(m, conn: Connection, issuer: Issuer, patient: str, expected: list[tuple[str, str, str]]) -> None:
    dpop = DpopKey()
    token = issuer.access_token(conn.organization, dpop)
    metadata = [
        ("authorization", f"DPoP {token}"),
        ("dpop", dpop.proof(conn.htu(LOOKUP_PATH), token)),
    ]
    request = m["lookup"].LookupRequest(
        patient=m["pointer"].PatientIdentifier(system=SYSTEM_FNR, value=patient)
    )
    try:
        response = conn.lookup.Lookup(request, metadata=metadata, timeout=CALL_TIMEOUT_S)
    except grpc.RpcError as e:
        raise grpc_error(f"Lookup at {conn.region.name}", e) from e

    state_name = m["lookup"].RegionState.Name
    for status in response.regions:
        step(
            f"  region {status.region}: {state_name(status.state).removeprefix('REGION_STATE_')}, "
            f"{status.pointer_count} pointer(s){' — ' + status.detail if status.detail else ''}"
        )
    for p in response.pointers:
        step(f"  pointer from {p.region}: {p.holder.name} {p.endpoint.base_url} {list(p.categories)}")

    answered = {s.region: state_name(s.state) for s in response.regions}
    check(
        set(answered) == set(REGIONS),
        f"Lookup: regions {sorted(answered)} listed, expected {sorted(REGIONS)}",
    )
    not_ok = {r: s for r, s in answered.items() if s != "REGION_STATE_OK"}
    check(not not_ok, f"Lookup: not every region answered OK: {not_ok}")
    # Set when pointers were withheld because a region could not be asked about the
    # patient's protections (blocks and opt-out).
    check(not response.withheld, f"Lookup: pointers withheld: {response.withheld}")
    check(not response.opted_out, "Lookup: the patient is reported as opted out")
    check(len(response.query_id) > 0, "Lookup: no query_id in the answer")
    found = {(p.region, p.holder.organization_number, p.endpoint.base_url) for p in response.pointers}
    for want in expected:
        check(want in found, f"Lookup: pointer {want} (region, holder, base_url) not in the answer")
    step(f"lookup {response.query_id}: both regions' pointers came back, every region OK")


def sync_and_export(m, conn: Connection, org: tuple[str, str]) -> None:
    reg = m["registry"]
    base_url = "https://dho.vest.example/fhir/r4/pil-python-example"
    batches = [
        [make_pointer(m, synthetic_fnr(), org, base_url, ["home-monitoring", "vital-signs"]) for _ in range(3)],
        [make_pointer(m, synthetic_fnr(), org, base_url, ["care-plans"]) for _ in range(2)],
    ]
    sent = [p for batch in batches for p in batch]

    def messages():
        yield reg.SyncPointersRequest(
            header=reg.SyncHeader(
                mode=reg.SYNC_MODE_MERGE,
                organization_number=org[0],
                all_or_nothing=True,
            )
        )
        for batch in batches:
            yield reg.SyncPointersRequest(batch=reg.PointerBatch(pointers=batch))

    try:
        report = conn.registry.SyncPointers(messages(), timeout=CALL_TIMEOUT_S)
    except grpc.RpcError as e:
        raise grpc_error(f"SyncPointers at {conn.region.name}", e) from e
    step(
        f"{conn.region.name}: sync of {len(sent)} pointers for {org[1]}: {report.inserted} inserted, "
        f"{report.updated} updated, {report.unchanged} unchanged, {report.removed} removed, "
        f"{report.rejected} rejected"
    )
    for e in report.errors:
        step(f"  record {e.position}: {e.field}: {e.message}")
    check(report.rejected == 0, f"SyncPointers: {report.rejected} record(s) rejected")
    check(
        report.inserted + report.updated + report.unchanged == len(sent),
        f"SyncPointers: {report.inserted + report.updated + report.unchanged} pointers stored, sent {len(sent)}",
    )
    check(not report.replace_applied, "SyncPointers: a merge sync reports replace_applied")

    try:
        exported = []
        for message in conn.registry.ExportPointers(
            reg.ExportPointersRequest(organization_number=org[0]), timeout=CALL_TIMEOUT_S
        ):
            exported.extend(message.pointers)
    except grpc.RpcError as e:
        raise grpc_error(f"ExportPointers at {conn.region.name}", e) from e
    step(f"{conn.region.name}: export of {org[1]}: {len(exported)} pointers")
    in_export = {
        (p.patient.system, p.patient.value, p.endpoint.base_url, tuple(sorted(p.categories)))
        for p in exported
        if p.holder.organization_number == org[0] and p.region == conn.region.name
    }
    check(
        all(p.holder.organization_number == org[0] for p in exported),
        "ExportPointers: the export holds another organization's pointers",
    )
    for p in sent:
        want = (p.patient.system, p.patient.value, p.endpoint.base_url, tuple(sorted(p.categories)))
        check(want in in_export, f"ExportPointers: a synced pointer ({p.endpoint.base_url}) is not in the export")
    step("every synced pointer is in the export")


def run(args: argparse.Namespace) -> None:
    demo_dir = args.demo_dir.resolve()
    regions = {name: Region.load(demo_dir, name) for name in REGIONS}
    for r in regions.values():
        step(f"region {r.name}: {r.authority(args.host)} (test_data = {str(r.test_data).lower()})")
        check(r.test_data, f"{r.name} does not accept synthetic test identifiers (test_data = false)")
    for org, _ in (HELSE_BERGEN, BERGEN_KOMMUNE, VEST_DHO):
        check(org_number_valid(org), f"organization number {org} is not valid")

    patient = args.patient or synthetic_fnr()
    problem = patient_id_error(SYSTEM_FNR, patient, allow_synthetic=True)
    check(problem is None, f"patient {patient}: {problem}")
    step(f"patient (synthetic fødselsnummer): {patient}")

    with tempfile.TemporaryDirectory(prefix="pil-stubs-") as stubs:
        m = load_stubs(args.proto_dir.resolve(), Path(stubs))
        step(f"gRPC stubs generated from {args.proto_dir.resolve() / 'pil' / 'v1'}")

        vest = Connection(m, regions["helse-vest"], args.host, HELSE_BERGEN[0])
        midt = Connection(m, regions["helse-midt"], args.host, BERGEN_KOMMUNE[0])
        nord = Connection(m, regions["helse-nord"], args.host, VEST_DHO[0])
        try:
            vest_url = "https://fhir.helse-bergen.example/r4/pil-python-example"
            midt_url = "https://fhir.bergen-kommune.example/r4/pil-python-example"
            upsert(m, vest, make_pointer(m, patient, HELSE_BERGEN, vest_url, ["clinical-notes", "lab-results"]))
            upsert(m, midt, make_pointer(m, patient, BERGEN_KOMMUNE, midt_url, ["nursing", "care-plans"]))

            issuer = Issuer.of_region(regions["helse-vest"].dir, regions["helse-vest"].auth)
            step(f"lookup at helse-vest as {HELSE_BERGEN[1]} (token from {issuer.iss}, kid {issuer.kid})")
            lookup(
                m,
                vest,
                issuer,
                patient,
                [
                    ("helse-vest", HELSE_BERGEN[0], vest_url),
                    ("helse-midt", BERGEN_KOMMUNE[0], midt_url),
                ],
            )

            sync_and_export(m, nord, VEST_DHO)
        finally:
            for conn in (vest, midt, nord):
                conn.close()


def main() -> int:
    here = Path(__file__).resolve().parent
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--demo-dir",
        type=Path,
        required=True,
        help="directory written by `pil-node demo --dir DIR` (helse-vest/, helse-midt/, helse-nord/)",
    )
    parser.add_argument(
        "--proto-dir",
        type=Path,
        default=here.parents[2] / "proto",
        help="directory holding pil/v1/*.proto (default: the repository's proto/)",
    )
    parser.add_argument(
        "--host",
        default="localhost",
        help="name to address the nodes by; must be in their certificates (default: localhost)",
    )
    parser.add_argument(
        "--patient",
        help="synthetic fødselsnummer to register and look up (default: a new random one)",
    )
    args = parser.parse_args()
    try:
        run(args)
    except CheckFailed as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 1
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
