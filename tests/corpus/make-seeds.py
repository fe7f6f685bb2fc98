"""Makes the signed seeds of the fuzz corpus (checkpoints, cosignatures, witness
requests) with Python's `cryptography`: an implementation independent of PIL's, so
the suite also checks PIL reads the C2SP formats as another reading of them writes
them. Deterministic: the keys come from fixed seeds. Run from this directory."""
import base64, hashlib, struct
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives import serialization


def key(seed):
    return Ed25519PrivateKey.from_private_bytes(hashlib.sha256(seed).digest())


def raw(public):
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def b64(b):
    return base64.b64encode(b).decode()


DASH = "\u2014"
log = key(b"pil corpus log key")
with open("log-key.pem", "wb") as f:
    f.write(log.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))
origin = "pil-audit/corpus"
body = origin + "\n1234\n" + b64(hashlib.sha256(b"root").digest()) + "\ntimestamp 1764000000000\n"
# signed-note key id: SHA-256(name || 0x0A || 0x01 || key)[:4]
kid = hashlib.sha256(origin.encode() + b"\n\x01" + raw(log.public_key())).digest()[:4]
note = body + "\n" + DASH + " " + origin + " " + b64(kid + log.sign(body.encode())) + "\n"

witness = key(b"pil corpus witness")
name = "witness.corpus.test"
# cosignature/v1: key id with type 0x04, timestamp (8, big-endian), signature over
# "cosignature/v1\ntime <t>\n" followed by the checkpoint body.
wkid = hashlib.sha256(name.encode() + b"\n\x04" + raw(witness.public_key())).digest()[:4]
ts = 1764000001
signed = ("cosignature/v1\ntime %d\n" % ts + body).encode()
cosig = DASH + " " + name + " " + b64(wkid + struct.pack(">Q", ts) + witness.sign(signed)) + "\n"
vkey = name + "+" + wkid.hex() + "+" + b64(b"\x04" + raw(witness.public_key())) + "\n"

files = {
    "checkpoints/signed.note": note,
    "checkpoints/cosigned.note": note + cosig,
    "checkpoints/body.txt": body,
    "checkpoints/vkey.txt": vkey,
    "witnesses.vkeys": vkey,
    "add-checkpoint/first.txt": "old 0\n\n" + note,
    "add-checkpoint/with-proof.txt": "old 1000\n"
    + "".join(b64(hashlib.sha256(bytes([i])).digest()) + "\n" for i in range(3)) + "\n" + note,
    "add-checkpoint/same-size.txt": "old 1234\n\n" + note + cosig,
}
for path, text in files.items():
    with open(path, "w") as f:
        f.write(text)
