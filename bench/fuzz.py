"""Long fuzzing runs of the three Hypothesis suites: request verifier, config loader, vault reader.

Runs the very test functions of ``tests/test_verify_fuzz.py``, ``tests/test_config_fuzz.py`` and
``tests/test_vault_fuzz.py`` with a bigger budget than CI: ``--minutes N`` (default 10, split
evenly between the suites and round-robin between each suite's tests, in batches of fresh
random examples) or ``--examples N`` (per test, one run). For each suite it prints the cases
tried, the failures with their falsifying example, the time, and a baseline measured in the
same run so the rate reads as a ratio:

* verifier: raw Ed25519 ``verify`` of one signature (pyca), the floor of any JWS check;
* config: ``yaml.safe_load`` of the example config alone, the floor of any YAML config load;
* vault: the raw AEAD decrypt of every chunk of one fuzz clip in memory (pyca), no I/O.

Then the peak RSS. Exit status 1 if any test failed. Run from the repository root:
``python bench/fuzz.py --minutes 2``.
"""

from __future__ import annotations

import argparse
import base64
import resource
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey  # noqa: E402

from agent import stream  # noqa: E402
from agent.age.stream import chunk_nonce  # noqa: E402
from tests import test_config_fuzz, test_vault_fuzz, test_verify_fuzz  # noqa: E402

BATCH = 200
"""Examples per Hypothesis run when running for a time budget (each run draws fresh ones)."""


@dataclass
class Suite:
    """One fuzz suite: its Hypothesis tests and the baseline operation its rate is read against."""

    name: str
    tests: list[Callable[..., None]]
    baseline_name: str
    baseline: Callable[[], object]
    cases: int = 0
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)


def _hypothesis_tests(module: Any) -> list[Callable[..., None]]:
    return [
        getattr(module, name)
        for name in sorted(vars(module))
        if name.startswith("test_") and hasattr(getattr(module, name), "hypothesis")
    ]


def _ed25519_baseline() -> Callable[[], object]:
    token = test_verify_fuzz.VALID.decode()
    head, body, sig = token.split(".")

    def unb64(text: str) -> bytes:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))

    public: Ed25519PublicKey = test_verify_fuzz.ALICE.key.public_key()
    signature, signed = unb64(sig), f"{head}.{body}".encode()
    return lambda: public.verify(signature, signed)


def _yaml_baseline() -> Callable[[], object]:
    text = test_config_fuzz.EXAMPLE.read_text()
    return lambda: yaml.safe_load(text)


def _aead_baseline() -> Callable[[], object]:
    c = test_vault_fuzz.corpus(test_vault_fuzz.CIPHERS[0])
    key = bytes(32)
    aead = stream.new_aead(c.vault.cipher, key)
    size = test_vault_fuzz.CHUNK
    plain = [c.a.plaintext[i : i + size] for i in range(0, len(c.a.plaintext), size)]
    sealed = [aead.encrypt(chunk_nonce(i, False), p, None) for i, p in enumerate(plain)]

    def decrypt_clip() -> None:
        for i, ct in enumerate(sealed):
            aead.decrypt(chunk_nonce(i, False), ct, None)

    return decrypt_clip


def _counting(test: Any, suite: Suite) -> None:
    """Count every example by wrapping the test's inner function (Hypothesis's documented hook)."""
    inner = test.hypothesis.inner_test

    def counted(*args: Any, **kwargs: Any) -> None:
        suite.cases += 1
        inner(*args, **kwargs)

    test.hypothesis.inner_test = counted


def _run(test: Any, examples: int, suite: Suite) -> bool:
    """Run ``test`` for ``examples`` fresh examples; record a failure. True if it passed."""
    # The suites pin their CI/dev profile at decoration; a bench run swaps in its own budget.
    test._hypothesis_internal_use_settings = settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=False,
        suppress_health_check=list(HealthCheck),
    )
    try:
        test()
    except Exception as exc:
        # Hypothesis raises an ExceptionGroup when it found several distinct bugs.
        found = list(exc.exceptions) if isinstance(exc, ExceptionGroup) else [exc]
        for one in found:
            notes = "\n".join(dict.fromkeys(getattr(one, "__notes__", [])))  # once each
            where = "".join(traceback.format_exception_only(type(one), one)).strip()
            suite.failures.append(f"{test.__name__}: {where}\n{notes}".strip())
        return False
    return True


def rate(fn: Callable[[], object], seconds: float = 1.0) -> float:
    """Calls per second of ``fn`` over about ``seconds``."""
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        fn()
        n += 1
    return n / elapsed


def run_suite(suite: Suite, *, budget: float | None, examples: int | None) -> None:
    """Run every test of ``suite`` for ``examples`` each, or round-robin until ``budget`` s."""
    for test in suite.tests:
        _counting(test, suite)
    start = time.perf_counter()
    failed: set[str] = set()
    if examples is not None:
        for test in suite.tests:
            _run(test, examples, suite)
    else:
        assert budget is not None
        deadline = start + budget
        while time.perf_counter() < deadline:
            live = [t for t in suite.tests if t.__name__ not in failed]
            if not live:
                break
            for test in live:
                if time.perf_counter() >= deadline:
                    break
                if not _run(test, BATCH, suite):
                    failed.add(test.__name__)  # shrunk and reported: no need to find it again
    suite.seconds = time.perf_counter() - start


def peak_rss_mib() -> float:
    """Peak resident set size of this process in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> int:
    """Run the suites and print one report per suite; 1 if anything failed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--minutes", type=float, default=10.0, help="total budget (default 10)")
    group.add_argument("--examples", type=int, help="examples per test instead of a budget")
    args = parser.parse_args(argv)
    suites = [
        Suite("verifier", _hypothesis_tests(test_verify_fuzz), "raw Ed25519 verify",
              _ed25519_baseline()),
        Suite("config", _hypothesis_tests(test_config_fuzz), "yaml.safe_load of the example",
              _yaml_baseline()),
        Suite("vault reader", _hypothesis_tests(test_vault_fuzz),
              "raw AEAD decrypt of one clip", _aead_baseline()),
    ]
    budget = None if args.examples is not None else args.minutes * 60 / len(suites)
    what = f"{args.examples} examples per test" if budget is None else f"{args.minutes:g} min"
    print(f"fuzz: {what}, {len(suites)} suites, python {sys.version.split()[0]}")
    for suite in suites:
        run_suite(suite, budget=budget, examples=args.examples)
        base = rate(suite.baseline)
        per_s = suite.cases / suite.seconds if suite.seconds else 0.0
        print(
            f"\n[{suite.name}] {len(suite.tests)} tests, {suite.cases} cases in "
            f"{suite.seconds:.1f} s = {per_s:,.0f} cases/s, {len(suite.failures)} failures"
        )
        print(
            f"  baseline: {suite.baseline_name} {base:,.0f}/s; "
            f"fuzz case = {per_s / base:.4f}x baseline ({base / per_s if per_s else 0:,.0f} "
            "baseline ops per case)"
        )
        for failure in suite.failures:
            print("  FAILED " + failure.replace("\n", "\n    "))
    print(f"\npeak RSS {peak_rss_mib():.0f} MiB")
    return 1 if any(s.failures for s in suites) else 0


if __name__ == "__main__":
    sys.exit(main())
