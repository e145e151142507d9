"""Coverage-guided differential fuzzer for the compiled codec (atheris / libFuzzer).

Every input is decoded by the compiled codec (an instrumented build of `_ccodec.c`, so libFuzzer sees
its branches) and by the pure codec; the outcomes must be identical (tests/codec_support.py), and
whatever decodes must re-encode identically. Part of every input also becomes a Message to encode.
Dialects: the two shipped ones plus three built here that reach the generic paths (text encodings
through CPython codecs, text/BCD/binary length prefixes of every width, nibble fields with pads, an
EBCDIC MTI, a hex-text secondary bitmap). A crash, a sanitizer report, a hang (-timeout) or a
mismatch (AssertionError) ends the run with a non-zero exit and the input saved as crash-*.

Run through tests/test_codec_atheris.py, which builds the instrumented extension and gives the
command; by hand (the long, opt-in run):

    GATEWAY_FUZZ_SECONDS=3600 .venv/bin/python -m pytest tests/test_codec_atheris.py -s

Arguments: --extension PATH (the instrumented _ccodec .so), then libFuzzer's own
(CORPUS_DIR -max_total_time=N -timeout=N ...).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def load_extension(path: str) -> None:
    """Make `import gateway.iso._ccodec` find the instrumented build (before gateway.iso.codec loads)."""
    spec = importlib.util.spec_from_file_location("gateway.iso._ccodec", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["gateway.iso._ccodec"] = module


def main() -> None:
    args = sys.argv[1:]
    if len(args) < 2 or args[0] != "--extension":
        raise SystemExit("usage: fuzz_codec.py --extension PATH [libFuzzer arguments]")
    load_extension(args[1])
    libfuzzer_args = [sys.argv[0], *args[2:]]

    import atheris

    sys.path.insert(0, str(HERE))
    from codec_support import codec_pair, same_decode, same_encode
    from test_codec_differential import _prefix_dialect, _text_dialect
    from test_codec_fuzz import BODIES

    from gateway.iso.message import Message
    from gateway.iso.spec import load_dialect

    dialects = [
        load_dialect("cup-pos"),
        load_dialect("iso87-ascii"),
        _text_dialect("gbk"),
        _prefix_dialect("cp500", 2),
        _prefix_dialect("bcd", 2),
    ]
    pairs = [codec_pair(d, lenient=lenient) for d in dialects for lenient in (False, True)]
    for _pure, compiled in pairs:
        assert compiled.implementation == "compiled"
        assert type(compiled.decode.__self__).__module__ == "gateway.iso._ccodec"

    def one_input(data: bytes) -> None:
        if len(data) < 2:
            return
        pure, compiled = pairs[data[0] % len(pairs)]
        body = data[2:]
        result = same_decode(pure, compiled, body)
        if result[0] == "Message":
            again = same_encode(pure, compiled, Message(result[1], dict(result[2])))
            assert again[0] == "bytes"
        if data[1] & 1:  # a message from the bytes, for the encoder
            provider = atheris.FuzzedDataProvider(body)
            fields = {}
            for _ in range(provider.ConsumeIntInRange(0, 10)):
                key = str(provider.ConsumeIntInRange(1, 130))
                fields[key] = provider.ConsumeUnicodeNoSurrogates(provider.ConsumeIntInRange(0, 24))
            mti = provider.ConsumeUnicodeNoSurrogates(4) if data[1] & 2 else "0200"
            same_encode(pure, compiled, Message(mti, fields))

    corpus = [a for a in libfuzzer_args[1:] if not a.startswith("-")]
    if corpus:  # seed an empty corpus with valid bodies of both shipped dialects
        seeds = Path(corpus[0])
        seeds.mkdir(parents=True, exist_ok=True)
        if not any(seeds.iterdir()):
            for i, (name, index) in enumerate([("cup-pos", 0), ("cup-pos", 1), ("iso87-ascii", 0), ("iso87-ascii", 2)]):
                (seeds / f"seed-{i}").write_bytes(bytes([0 if name == "cup-pos" else 2, 0]) + BODIES[name][index])
    atheris.Setup(libfuzzer_args, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
