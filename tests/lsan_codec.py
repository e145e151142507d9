"""The leak-check workload: every path of the compiled codec (tests/test_codec_compiled.py's inputs),
many rounds, in a process run under LeakSanitizer (tests/test_codec_sanitizers.py starts it). A leaked
object has no pointer left to it; LSan reports it at exit with the allocation's stack.

    python tests/lsan_codec.py --extension PATH ROUNDS
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fuzz_codec import load_extension


def main() -> int:
    if len(sys.argv) != 4 or sys.argv[1] != "--extension":
        raise SystemExit("usage: lsan_codec.py --extension PATH ROUNDS")
    load_extension(sys.argv[2])
    from codec_support import codec_pair, exercise

    from gateway.iso.spec import load_dialect

    codecs = [codec_pair(load_dialect(n), lenient=lenient)[1] for n in ("cup-pos", "iso87-ascii") for lenient in (0, 1)]
    assert all(type(c.decode.__self__).__module__ == "gateway.iso._ccodec" for c in codecs)
    exercise(codecs, int(sys.argv[3]))
    print("workload done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
