"""Vault throughput and memory: a large clip through the vault vs the raw AEAD and stock age.

For each cipher, in one run on the same bytes (a 64 KiB write size by default):

* raw AEAD: pyca ``encrypt_into``/``decrypt_into`` over the same chunks in memory, no I/O
  (the floor no implementation on this machine can beat);
* raw AEAD + SHA-256: the least CPU work a vault write must do (it records the plaintext hash);
* plain write + fsync: the same bytes written unencrypted with the vault's fsync cadence (one
  per MiB), the least disk work a crash-safe write must do;
* vault write: ``create_clip`` .. ``finish`` (hash, seal, write, fsync every MiB, rename,
  index update) and vault read (``open_clip`` + ``read`` until the end);
* ``age -r`` / ``age -d`` on the same plaintext as a file, when age is installed (age always
  uses ChaCha20-Poly1305 in 64 KiB chunks);
* peak RSS growth of the process during the vault write and read (Linux VmHWM, reset per
  phase through /proc/self/clear_refs).

Run: ``python bench/vault.py [--mib 512]``. Goals: vault >= 0.5x the raw AEAD, RSS growth
<= 32 MiB.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

from agent import stream
from agent.age.stream import chunk_nonce
from agent.vault import DEFAULT_SYNC_BYTES, Vault

MiB = 1024 * 1024
RSS_GOAL_MIB = 32.0
RATIO_GOAL = 0.5


def blocks(write_size: int, total: int) -> Iterator[bytes]:
    """``total`` bytes as write_size pieces drawn from a 1 MiB pool of random blocks."""
    pool = [os.urandom(write_size) for _ in range(max(1, MiB // write_size))]
    for i in range(total // write_size):
        yield pool[i % len(pool)]


def _status_kib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return float(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class PeakRSS:
    """Peak resident set growth over a phase, in MiB."""

    def __enter__(self) -> PeakRSS:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            self.exact = True
        except OSError:
            self.exact = False  # ru_maxrss cannot be reset: growth is then an upper bound
        self.before = _status_kib("VmRSS")
        self.growth = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        peak = (
            _status_kib("VmHWM")
            if self.exact
            else float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        )
        self.growth = max(0.0, peak - self.before) / 1024


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def raw_encrypt(cipher: str, write_size: int, total: int, *, with_sha: bool) -> None:
    aead = stream.new_aead(cipher, os.urandom(32))
    out = bytearray(write_size + stream.TAG_SIZE)
    digest = hashlib.sha256()
    for i, block in enumerate(blocks(write_size, total)):
        aead.encrypt_into(chunk_nonce(i, False), block, None, out)
        if with_sha:
            digest.update(block)


def raw_decrypt(cipher: str, write_size: int, total: int) -> None:
    key = os.urandom(32)
    aead = stream.new_aead(cipher, key)
    pool = [aead.encrypt(chunk_nonce(0, False), b, None) for b in blocks(write_size, MiB)]
    out = bytearray(write_size)
    for i in range(total // write_size):
        aead.decrypt_into(chunk_nonce(0, False), pool[i % len(pool)], None, out)


def plain_durable_write(path: Path, write_size: int, total: int) -> None:
    """The same bytes to a file with the vault's fsync cadence and no crypto: the disk floor."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        unsynced = 0
        for block in blocks(write_size, total):
            os.write(fd, block)
            unsynced += len(block)
            if unsynced >= DEFAULT_SYNC_BYTES:
                os.fsync(fd)
                unsynced = 0
        os.fsync(fd)
    finally:
        os.close(fd)
    path.unlink()


def vault_write(vault: Vault, write_size: int, total: int) -> str:
    start = datetime.now(UTC)
    with vault.create_clip(start, "application/octet-stream") as writer:
        for block in blocks(write_size, total):
            writer.write(block)
        return writer.finish(start + timedelta(seconds=1), 1).id


def vault_read(vault: Vault, clip_id: str, write_size: int) -> int:
    n = 0
    with vault.open_clip(clip_id) as reader:
        while piece := reader.read(write_size):
            n += len(piece)
    return n


def age_times(work: Path, write_size: int, total: int) -> tuple[float, float] | None:
    """Seconds for ``age -r`` and ``age -d`` on the same plaintext, or None without age."""
    age, keygen = shutil.which("age"), shutil.which("age-keygen")
    if age is None or keygen is None:
        return None
    identity = work / "age.key"
    subprocess.run([keygen, "-o", str(identity)], check=True, capture_output=True)
    recipient = subprocess.run(
        [keygen, "-y", str(identity)], check=True, capture_output=True, text=True
    ).stdout.strip()
    plain, sealed = work / "plain.bin", work / "plain.bin.age"
    with plain.open("wb") as f:
        for block in blocks(write_size, total):
            f.write(block)
    enc = timed(
        lambda: subprocess.run([age, "-r", recipient, "-o", str(sealed), str(plain)], check=True)
    )
    plain.unlink()
    dec = timed(
        lambda: subprocess.run(
            [age, "-d", "-i", str(identity), "-o", os.devnull, str(sealed)], check=True
        )
    )
    sealed.unlink()
    return enc, dec


def rate(total: int, seconds: float) -> str:
    return f"{total / MiB / seconds:9.1f} MiB/s  ({seconds:6.2f} s)"


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def bench_cipher(cipher: str, work: Path, args: argparse.Namespace) -> list[str]:
    total, ws = args.mib * MiB, args.write_size
    lines = [f"== {cipher}"]
    t_raw_enc = timed(lambda: raw_encrypt(cipher, ws, total, with_sha=False))
    t_raw_sha = timed(lambda: raw_encrypt(cipher, ws, total, with_sha=True))
    t_raw_dec = timed(lambda: raw_decrypt(cipher, ws, total))
    t_plain = timed(lambda: plain_durable_write(work / "plain-durable.bin", ws, total))
    root = work / cipher
    root.mkdir()
    with Vault(root, os.urandom(32), cipher=cipher, chunk_size=args.chunk_size) as vault:
        clip_id = ""

        def write() -> None:
            nonlocal clip_id
            clip_id = vault_write(vault, ws, total)

        with PeakRSS() as write_rss:
            t_write = timed(write)
        got = 0

        def read() -> None:
            nonlocal got
            got = vault_read(vault, clip_id, ws)

        with PeakRSS() as read_rss:
            t_read = timed(read)
        assert got == total, (got, total)
    shutil.rmtree(root)
    lines += [
        f"raw AEAD encrypt       {rate(total, t_raw_enc)}",
        f"raw AEAD + SHA-256     {rate(total, t_raw_sha)}",
        f"plain write + fsync    {rate(total, t_plain)}",
        f"vault write            {rate(total, t_write)}",
        f"raw AEAD decrypt       {rate(total, t_raw_dec)}",
        f"vault read             {rate(total, t_read)}",
    ]
    ratio_w, ratio_r = t_raw_enc / t_write, t_raw_dec / t_read
    lines += [
        f"ratio vault write / raw AEAD encrypt: {ratio_w:.2f}x "
        f"(goal >= {RATIO_GOAL}x: {verdict(ratio_w >= RATIO_GOAL)})",
        f"ratio vault write / (raw AEAD + SHA-256): {t_raw_sha / t_write:.2f}x",
        f"ratio vault write / plain write with the same fsyncs: {t_plain / t_write:.2f}x",
        f"ratio vault read / raw AEAD decrypt: {ratio_r:.2f}x "
        f"(goal >= {RATIO_GOAL}x: {verdict(ratio_r >= RATIO_GOAL)})",
    ]
    if args.age_times is not None:
        enc, dec = args.age_times
        lines += [
            f"ratio vault write / age -r encrypt: {enc / t_write:.2f}x "
            f"(age {total / MiB / enc:.1f} MiB/s)",
            f"ratio vault read / age -d decrypt: {dec / t_read:.2f}x "
            f"(age {total / MiB / dec:.1f} MiB/s)",
        ]
    peak = max(write_rss.growth, read_rss.growth)
    exact = "" if write_rss.exact else " (upper bound: VmHWM could not be reset)"
    lines.append(
        f"peak RSS growth: write {write_rss.growth:.1f} MiB, read {read_rss.growth:.1f} MiB "
        f"(goal <= {RSS_GOAL_MIB:.0f} MiB: {verdict(peak <= RSS_GOAL_MIB)}){exact}"
    )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=512, help="clip size in MiB (default 512)")
    parser.add_argument("--write-size", type=int, default=64 * 1024, help="bytes per write")
    parser.add_argument("--chunk-size", type=int, default=64 * 1024, help="vault chunk size")
    parser.add_argument(
        "--cipher",
        choices=[*stream.CIPHERS, "both"],
        default="both",
        help="which cipher(s) to measure (default both)",
    )
    parser.add_argument("--dir", type=Path, default=None, help="scratch directory (disk)")
    args = parser.parse_args()
    ciphers = stream.CIPHERS if args.cipher == "both" else (args.cipher,)
    cpu_aes = stream.cpu_has_aes(Path("/proc/cpuinfo").read_text(errors="replace"))
    print(
        f"vault bench: {args.mib} MiB clip in {args.write_size // 1024} KiB writes, "
        f"chunk {args.chunk_size // 1024} KiB, CPU AES instructions: {'yes' if cpu_aes else 'no'}, "
        f"auto picks {stream.resolve_cipher('auto', Path('/proc/cpuinfo').read_text())}"
    )
    with tempfile.TemporaryDirectory(prefix="vault-bench-", dir=args.dir) as tmp:
        work = Path(tmp)
        print(f"scratch: {work}", flush=True)
        args.age_times = age_times(work, args.write_size, args.mib * MiB)
        if args.age_times is None:
            print("age not installed: no age comparison")
        for cipher in ciphers:
            print("\n".join(bench_cipher(cipher, work, args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
