"""Bad input never stops a run and never goes unreported.

Every test builds its bad files itself. Most cases share ONE run (`mixed`): a tree of good files
and every kind of bad file, extracted with random VGGish weights; a second run (`clean`) over the
good files alone, read from a NUL-separated list on stdin, is the reference. Each case asserts
(a) that its file is reported with a reason a person understands (stage, type, message: through
`fusefeat info DIR --json`, `fusefeat.load(DIR).errors` and the JSON summary), or processed and
flagged as the README documents; and (b) that every good file of the same run is present and has
its clean-run vector. Cases that cannot share a run (empty input, unwritable output, full disk,
argument and weights errors, a file deleted after discovery, a one-hour file) run on their own.
"""

from __future__ import annotations

import ctypes
import functools
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
import soundfile as sf

from conftest import FSDD, NSYNTH, REPO

import fusefeat

SR = 16000
VGGISH_MIN = 15600  # VGGish's shortest clip: one 0.96 s example plus its last STFT frame (0.975 s)
STAGES = {"discover", "decode", "resample", "model", "write"}
# The window length for these runs: 2 s -> 1.92 s windows (whole VGGish examples), so that clips
# longer than 3.84 s are windowed and a failure inside a later window is exercised too.
WINDOW = ["--window-seconds", "2"]


# ---- running the CLI ---------------------------------------------------------------------------

def cli(*args, cwd=None, stdin: bytes | None = None, preexec=None, env=None, timeout=600):
    """`python -m fusefeat ARGS` in a subprocess (bytes in, text out: names may be non-UTF-8)."""
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = str(REPO) + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env.setdefault("OMP_NUM_THREADS", "2")
    full_env["HF_HUB_OFFLINE"] = "1"
    full_env.update(env or {})
    result = subprocess.run([sys.executable, "-m", "fusefeat", *map(os.fsencode, map(str, args))],
                            cwd=cwd, input=stdin, env=full_env, capture_output=True,
                            timeout=timeout, preexec_fn=preexec)
    result.stdout = result.stdout.decode("utf-8", "replace")
    result.stderr = result.stderr.decode("utf-8", "replace")
    return result


def summary(result) -> dict:
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no JSON summary (exit {result.returncode}):\n{result.stdout}\n{result.stderr}"
    return json.loads(lines[-1])


def info_json(out) -> dict:
    result = cli("info", out, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def vectors(out) -> dict:
    feats = fusefeat.load(out)
    try:
        return dict(zip(feats.paths, np.asarray(feats.embeddings)))
    finally:
        feats.close()


def rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def same_vector(a, b, tol=1e-5) -> bool:
    """Equal up to batch rounding (a clip's vector does not depend on its batch beyond 1e-5)."""
    return rel(a, b) <= tol


# ---- a process for which chmod 000 bites --------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_PR_CAPBSET_DROP = 24
_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH = 1, 2


def _drop_dac_capabilities():  # runs in the child, between fork and exec
    for cap in (_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH):
        if _libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


@functools.lru_cache(maxsize=None)
def unprivileged():
    """(preexec_fn, None) for a child process that file permissions apply to, or (None, reason)
    when there is none. Not root: permissions already apply (preexec_fn None). Root: the child
    keeps uid 0 but loses CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from its bounding set, so after
    exec it is an ordinary owner of its files (the interpreter under /root stays reachable, which
    rules out `nobody` here). Verified on a chmod 000 file before use."""
    with tempfile.TemporaryDirectory() as scratch:
        probe = Path(scratch) / "locked"
        probe.write_text("x")
        probe.chmod(0)
        candidates = [None] if os.geteuid() != 0 else [_drop_dac_capabilities]
        for preexec in candidates:
            try:
                result = subprocess.run([sys.executable, "-c", f"open({str(probe)!r}).read()"],
                                        capture_output=True, text=True, preexec_fn=preexec)
            except (OSError, subprocess.SubprocessError) as exc:
                return None, f"cannot drop privileges here: {exc}"
            if result.returncode != 0 and "PermissionError" in result.stderr:
                return preexec, None
    return None, ("running as root and file permissions cannot be made to apply to a child "
                  "process (dropping CAP_DAC_OVERRIDE was refused)")


# ---- building audio ----------------------------------------------------------------------------

def tone(seconds: float, freq: float = 440.0, rate: int = SR, seed: int = 0) -> np.ndarray:
    n = int(round(seconds * rate))
    t = np.arange(n) / rate
    noise = np.random.default_rng(seed).standard_normal(n)
    return (0.3 * np.sin(2 * np.pi * freq * t) + 0.05 * noise).astype(np.float32)


def wav_bytes(data, rate=SR, subtype="PCM_16", fmt="WAV") -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, data, rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


def png_bytes() -> bytes:
    """A real 1x1 PNG image."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00\xff\x00\x00")) + chunk(b"IEND", b""))


def id3v2_tag() -> bytes:
    """An ID3v2.3 tag (title, artist, 1 KiB of padding), as taggers put before MP3 frames."""
    frames = b""
    for frame_id, text in ((b"TIT2", "bad input test"), (b"TPE1", "fusefeat")):
        body = b"\x00" + text.encode("latin-1")
        frames += frame_id + struct.pack(">I", len(body)) + b"\x00\x00" + body
    size = len(frames) + 1024
    syncsafe = bytes([(size >> 21) & 0x7F, (size >> 14) & 0x7F, (size >> 7) & 0x7F, size & 0x7F])
    return b"ID3\x03\x00\x00" + syncsafe + frames + b"\x00" * 1024


def wav_with_format_tag(data, tag: int) -> bytes:
    raw = bytearray(wav_bytes(data))
    fmt = raw.find(b"fmt ")
    struct.pack_into("<H", raw, fmt + 8, tag)
    return bytes(raw)


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def resampled(wave: np.ndarray, rate: int, new_rate: int) -> np.ndarray:
    import torch
    import torchaudio

    return torchaudio.functional.resample(torch.from_numpy(wave), rate, new_rate).numpy()


REF = tone(2.0)  # the signal behind the encoding variants
HALF = tone(0.5, freq=660, seed=1)
TRUNCATED_SOURCE = tone(3.0, freq=550, seed=2)  # cut to 1.5 s: not padded


def build_good(root: Path) -> dict[str, str]:
    """The good files: real clips, odd-but-valid encodings, odd names. Returns {key: note}."""
    good = {}

    def add(key: str | bytes, data: bytes, note: str = "") -> None:
        path = root / os.fsdecode(key)
        write(path, data)
        good[fusefeat_key(key)] = note

    add("speech/0_george_0.wav", (FSDD / "0_george_0.wav").read_bytes(), "8 kHz speech")
    add("speech/3_jackson_12.wav", (FSDD / "3_jackson_12.wav").read_bytes(), "8 kHz speech")
    note = sorted(NSYNTH.iterdir())[0]
    add(f"notes/{note.name}", note.read_bytes(), "16 kHz, 4 s: two windows")
    add("ref/tone.wav", wav_bytes(REF, subtype="FLOAT"))
    add("formats/8ch.wav", wav_bytes(np.repeat(REF[:, None], 8, axis=1), subtype="FLOAT"))
    high = resampled(REF, SR, 192000)
    add("formats/192k.wav", wav_bytes(high, 192000, subtype="FLOAT"))
    add("ref/192k_resampled_by_hand.wav", wav_bytes(resampled(high, 192000, SR), subtype="FLOAT"))
    add("formats/u8.wav", wav_bytes(REF, subtype="PCM_U8"))
    add("formats/f64.wav", wav_bytes(REF.astype(np.float64), subtype="DOUBLE"))
    mp3 = wav_bytes(REF, fmt="MP3", subtype="MPEG_LAYER_III")
    add("formats/plain.mp3", mp3)
    add("formats/id3.mp3", id3v2_tag() + mp3)
    add("short/one_sample.wav", wav_bytes(np.array([0.5], np.float32), subtype="FLOAT"))
    add("short/one_sample_padded_by_hand.wav",
        wav_bytes(np.pad(np.array([0.5], np.float32), (0, VGGISH_MIN - 1)), subtype="FLOAT"))
    add("short/half_second.wav", wav_bytes(HALF, subtype="FLOAT"))
    add("short/half_second_padded_by_hand.wav",
        wav_bytes(np.pad(HALF, (0, VGGISH_MIN - HALF.size)), subtype="FLOAT"))
    add("content/silent.wav", wav_bytes(np.zeros(SR, np.float32)))
    clipped = np.clip(4.0 * tone(1.0, freq=220, seed=3) + 0.3, -1.0, 1.0)  # DC offset, clipped
    add("content/clipped_dc.wav", wav_bytes(clipped, subtype="FLOAT"))
    whole = wav_bytes(TRUNCATED_SOURCE)  # PCM_16, 44-byte header: cut inside the data chunk
    kept_bytes = (len(whole) - 44) // 2 // 2 * 2
    add("content/truncated_data.wav", whole[:44 + kept_bytes])
    add("content/truncated_data_equivalent.wav", wav_bytes(TRUNCATED_SOURCE[:kept_bytes // 2]))
    names = ["names/with space.wav", "names/new\nline.wav", "names/a,b,c.wav",
             'names/double"quote.wav', "names/single'quote.wav", "names/ünïcödé ☃.wav",
             b"names/latin1-caf\xe9.wav", "names/-o dash.wav"]
    for i, name in enumerate(names):
        add(name, wav_bytes(tone(1.0, freq=300 + 50 * i, seed=10 + i)))
    add("dup/one/same.wav", wav_bytes(tone(1.0, freq=1000, seed=30)))
    add("dup/two/same.wav", wav_bytes(tone(1.0, freq=1500, seed=31)))
    add("x.wav/inside.wav", wav_bytes(tone(1.0, freq=800, seed=32)), "in a directory named x.wav")
    return good


def fusefeat_key(name: str | bytes) -> str:
    """The key fusefeat stores for a relative name: UTF-8, undecodable bytes as \\xNN."""
    raw = name if isinstance(name, bytes) else name.encode()
    return raw.decode("utf-8", "backslashreplace")


# bad file -> (stage, type, words the message must hold)
EXPECTED_FAILURES = {
    "bad/empty.wav": ("decode", "EmptyFile", "empty file (0 bytes)"),
    "bad/header_only.wav": ("decode", "TruncatedFile", "truncated file"),
    "bad/text.wav": ("decode", "NotAudio", "looks like text"),
    "bad/image.flac": ("decode", "NotAudio", "looks like a PNG image"),
    "bad/codec.wav": ("decode", "UnsupportedCodec", "format 0x1234"),
    "bad/nan.wav": ("decode", "NonFiniteSamples", "3 NaN, 0 infinite"),
    "bad/inf.wav": ("decode", "NonFiniteSamples", "0 NaN, 2 infinite"),
    "bad/nan_in_third_window.wav": ("decode", "NonFiniteSamples", "1 NaN, 0 infinite"),
    "bad/no_samples.wav": ("decode", "EmptyAudio", "no audio samples"),
    "bad/dangling.wav": ("discover", "BrokenSymlink", "broken symbolic link"),
    "bad/loop_a.wav": ("discover", "SymlinkLoop", "symbolic link loop"),
    "bad/loop_b.wav": ("discover", "SymlinkLoop", "symbolic link loop"),
    # named in the --files-from list (keys as listed, relative to the run's directory)
    "../../gone/deleted_after_listing.wav": ("decode", "FileNotFound", "deleted or moved"),
    "../../mixed/x.wav": ("decode", "IsADirectory", "is a directory"),
}
PERMISSION_FAILURES = {
    "bad/locked.wav": ("decode", "PermissionDenied", "permission denied"),
    "bad/locked_dir": ("discover", "PermissionError", "cannot list this directory"),
}


def build_bad(root: Path, permissions: bool) -> None:
    """Every bad file of the shared run, under root/bad/."""
    bad = root / "bad"
    good = wav_bytes(tone(1.0))
    write(bad / "empty.wav", b"")
    write(bad / "header_only.wav", good[:30])
    write(bad / "text.wav", b"this is a text file with a .wav name\nsecond line\n")
    write(bad / "image.flac", png_bytes())
    write(bad / "codec.wav", wav_with_format_tag(tone(1.0), 0x1234))
    nan = tone(1.0)
    nan[[10, 500, 9000]] = np.nan
    write(bad / "nan.wav", wav_bytes(nan, subtype="FLOAT"))
    inf = tone(1.0)
    inf[100], inf[200] = np.inf, -np.inf
    write(bad / "inf.wav", wav_bytes(inf, subtype="FLOAT"))
    late = tone(8.0, freq=350, seed=4)  # four 1.92 s windows; the first two are computed first
    late[int(6.5 * SR)] = np.nan
    write(bad / "nan_in_third_window.wav", wav_bytes(late, subtype="FLOAT"))
    write(bad / "no_samples.wav", wav_bytes(np.zeros(0, np.float32)))
    os.symlink("does-not-exist.wav", bad / "dangling.wav")
    os.symlink("loop_b.wav", bad / "loop_a.wav")
    os.symlink("loop_a.wav", bad / "loop_b.wav")
    (bad / "dirloop").mkdir()
    os.symlink("..", bad / "dirloop" / "up")  # a directory loop: walked once, never reported
    write(bad / "not_audio.txt", b"skipped: no audio extension")
    if permissions:
        write(bad / "locked.wav", good).chmod(0)
        write(bad / "locked_dir" / "hidden.wav", good)
        (bad / "locked_dir").chmod(0)


def snapshot(root: Path, skip: Path) -> dict:
    """Every path under root (but `skip`) with its type, size and mtime; links not followed."""
    seen = {}
    for directory, dirs, files in os.walk(root):
        if Path(directory) == skip or skip in Path(directory).parents:
            dirs[:] = []
            continue
        for name in dirs + files:
            path = Path(directory) / name
            if path == skip:
                continue
            st = os.lstat(path)
            seen[str(path.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return seen


# ---- the shared run -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def weights(random_checkpoints):
    return random_checkpoints("vggish")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, weights):
    """The clean reference run and the mixed run (good + bad files), and what they left."""
    root = tmp_path_factory.mktemp("bad_input")
    preexec, why_not = unprivileged()
    permissions = why_not is None
    clean, mixed = root / "clean", root / "mixed"
    good = build_good(clean)
    build_good(mixed)
    build_bad(mixed, permissions)
    outside = root / "outside"  # good files outside the run's directory, named through ".."
    write(outside / "evil.wav", wav_bytes(REF, subtype="FLOAT"))
    write(outside / "dots.wav", wav_bytes(REF, subtype="FLOAT"))
    write(outside / "absolute.wav", wav_bytes(REF, subtype="FLOAT"))
    deep = root / "work" / "deep"  # the mixed run's working directory
    deep.mkdir(parents=True)
    listing = root / "list.txt"
    listing.write_text("\n".join([
        "../../gone/deleted_after_listing.wav",  # listed, then gone before decoding
        "../../mixed/x.wav",  # a directory named like audio
        "../../outside/evil.wav",
        "./../../work/../outside/dots.wav",
        str(outside / "absolute.wav"),
    ]) + "\n")
    model_args = ["-m", "vggish", "-w", weights, "-q", *WINDOW]
    args = [*model_args, "--shard-size", "7"]

    # clean: the good files alone, listed NUL-separated on stdin (names hold newlines and bytes
    # that are not UTF-8: `find -print0` style is the only way to list them), with stdin decoded
    # strictly as in a desktop UTF-8 locale (en_US.UTF-8: the list is read as bytes regardless)
    names = sorted(os.fsencode(p.relative_to(clean)) for p in clean.rglob("*") if p.is_file())
    clean_result = cli("extract", "--files-from", "-", "--null", *args, "-o", root / "clean_out",
                       cwd=clean, stdin=b"\0".join(names) + b"\0",
                       env={"PYTHONIOENCODING": "utf-8:strict"})
    assert clean_result.returncode == 0, clean_result.stderr

    before = snapshot(root, skip=root / "mixed_out")
    start = time.monotonic()
    mixed_result = cli("extract", "../../mixed", "--files-from", listing, *args,
                       "-o", root / "mixed_out", cwd=deep, preexec=preexec)
    seconds = time.monotonic() - start
    after = snapshot(root, skip=root / "mixed_out")
    expected = dict(EXPECTED_FAILURES, **(PERMISSION_FAILURES if permissions else {}))
    yield {
        "root": root, "clean": clean, "mixed": mixed, "good": good, "deep": deep,
        "listing": listing, "args": args, "model_args": model_args, "preexec": preexec,
        "why_not": why_not,
        "clean_out": root / "clean_out", "out": root / "mixed_out",
        "clean_result": clean_result, "result": mixed_result, "seconds": seconds,
        "before": before, "after": after, "expected": expected,
        "clean_vectors": vectors(root / "clean_out"), "vectors": vectors(root / "mixed_out"),
        "info": info_json(root / "mixed_out"),
    }
    if permissions:  # let the temporary tree be removed
        for path in (mixed / "bad" / "locked.wav", mixed / "bad" / "locked_dir"):
            path.chmod(0o755)


def record(runs, key):
    """The error record of `key`, checked the same through `info --json` and `load().errors`."""
    by_info = {f["path"]: f for f in runs["info"]["failures"]}
    feats = fusefeat.load(runs["out"])
    by_load = {f.path: f for f in feats.errors}
    feats.close()
    assert key in by_info, f"{key!r} is not reported; reported: {sorted(by_info)}"
    assert key in by_load
    entry = by_info[key]
    loaded = by_load[key]
    assert (loaded.stage, loaded.error_type, loaded.message) == (
        entry["stage"], entry["type"], entry["message"])
    assert entry["stage"] in STAGES and entry["type"] and entry["message"]
    return entry


def assert_reported(runs, key):
    stage, kind, words = runs["expected"][key]
    entry = record(runs, key)
    assert (entry["stage"], entry["type"]) == (stage, kind), entry
    assert words in entry["message"], entry
    group = runs["info"]["failures_by_reason"][f"{stage}: {kind}"]
    assert group["count"] >= 1
    assert_good_files_intact(runs)
    return entry


def assert_good_files_intact(runs):
    """Every good file of the mixed run is there, unflagged unless its case says so, with the
    vector the clean run (good files alone) gives it."""
    mixed, clean = runs["vectors"], runs["clean_vectors"]
    assert set(clean) == set(runs["good"])
    missing = set(clean) - set(mixed)
    assert not missing, f"good files missing from the mixed run: {sorted(missing)}"
    worst = max(rel(mixed[k], clean[k]) for k in clean)
    assert worst <= 1e-5, worst
    assert all(np.isfinite(v).all() for v in mixed.values())


def row(runs, key):
    feats = fusefeat.load(runs["out"])
    try:
        i = feats.paths.index(key)
        return {"vector": np.asarray(feats.embeddings[i]), "flags": int(feats.flags[i]),
                "duration_s": float(feats.duration_s[i]), "sample_rate": int(feats.sample_rate[i])}
    finally:
        feats.close()


# ---- the run as a whole ------------------------------------------------------------------------

def test_run_completes_with_exit_code_3_and_counts(runs):
    result = runs["result"]
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr
    s = summary(result)
    expected = runs["expected"]
    n_good = len(runs["good"]) + 3  # and the three good files outside, named through ".."
    assert s["status"] == "partial"
    assert s["failed"] == s["failed_total"] == len(expected)
    assert s["extracted"] == n_good
    assert s["pending"] == 0
    assert f"{len(expected)} file(s) failed" in result.stderr
    report = runs["info"]
    assert report["failed"] == len(expected) and report["committed"] == n_good
    assert {f["path"] for f in report["failures"]} == set(expected)
    assert sum(g["count"] for g in report["failures_by_reason"].values()) == len(expected)
    assert_good_files_intact(runs)
    clean = summary(runs["clean_result"])
    assert clean["status"] == "complete" and clean["extracted"] == len(runs["good"])


def test_info_lists_failures_grouped_by_reason(runs):
    groups = runs["info"]["failures_by_reason"]
    assert groups["decode: NonFiniteSamples"]["count"] == 3
    assert groups["discover: SymlinkLoop"]["count"] == 2
    assert groups["decode: NotAudio"]["count"] == 2
    assert set(groups["decode: NotAudio"]["messages"]) == {
        record(runs, k)["message"] for k in ("bad/text.wav", "bad/image.flac")}
    text = cli("info", runs["out"])
    assert text.returncode == 0 and "Traceback" not in text.stderr
    assert "failures by reason" in text.stdout
    for reason in groups:
        assert reason in text.stdout
    # each example with its own message where it differs from the group's first one
    assert "bad/text.wav: not audio: the content looks like text" in text.stdout
    assert "../../gone/deleted_after_listing.wav" in text.stdout


def test_never_writes_outside_out(runs):
    """Inputs named through "..", "./..", absolute paths; the run's own directory; none of it
    changes: everything the run wrote is under --out."""
    assert runs["before"] == runs["after"]
    assert not any(runs["deep"].iterdir())
    for key in ("../../outside/evil.wav", "../../outside/dots.wav",
                str(runs["root"] / "outside" / "absolute.wav")):
        # stored as a name only, with the vector of the same audio inside the tree
        assert same_vector(runs["vectors"][key], runs["vectors"]["ref/tone.wav"])
    out = runs["out"]
    written = {p.relative_to(out).parts[0] for p in out.rglob("*")}
    assert written <= {"fusefeat.json", "parts", ".lock-p0000of0001"} | {
        p.name for p in out.glob("shard-*.h5")}


# ---- one test per case ---------------------------------------------------------------------------

def test_zero_byte_file(runs):
    assert_reported(runs, "bad/empty.wav")


def test_truncated_wav_header(runs):
    entry = assert_reported(runs, "bad/header_only.wav")
    assert "holds 30 bytes" in entry["message"]


def test_truncated_data_chunk_is_read_as_far_as_it_goes_and_flagged(runs):
    r = row(runs, "content/truncated_data.wav")
    assert r["flags"] & 4  # truncated
    equivalent = row(runs, "content/truncated_data_equivalent.wav")
    assert equivalent["flags"] == 0
    assert r["duration_s"] == pytest.approx(equivalent["duration_s"])
    assert same_vector(r["vector"], equivalent["vector"])
    assert runs["info"]["flags"]["truncated"] == 1
    assert_good_files_intact(runs)


def test_text_file_named_wav(runs):
    assert_reported(runs, "bad/text.wav")


def test_png_named_flac(runs):
    assert_reported(runs, "bad/image.flac")


def test_unsupported_codec(runs):
    entry = assert_reported(runs, "bad/codec.wav")
    assert "libsndfile cannot decode" in entry["message"] and "ffmpeg" in entry["message"]


def test_nan_samples(runs):
    entry = assert_reported(runs, "bad/nan.wav")
    assert "from sample 10" in entry["message"]


def test_inf_samples(runs):
    assert_reported(runs, "bad/inf.wav")


def test_nan_in_a_later_window_of_a_long_file(runs):
    """Windows before the bad one were computed; the file still fails as a whole (no partial
    vector), and nothing of it leaks into other rows."""
    assert_reported(runs, "bad/nan_in_third_window.wav")
    assert "bad/nan_in_third_window.wav" not in runs["vectors"]


def test_zero_samples(runs):
    assert_reported(runs, "bad/no_samples.wav")


@pytest.mark.parametrize("name", ["one_sample", "half_second"])
def test_short_clips_are_zero_padded_and_flagged(runs, name):
    """README decision: shorter than VGGish's 0.975 s -> zero-padded at the end and flagged
    `padded`; the vector equals that of the same clip padded by hand."""
    r = row(runs, f"short/{name}.wav")
    by_hand = row(runs, f"short/{name}_padded_by_hand.wav")
    assert r["flags"] == 1 and by_hand["flags"] == 0
    assert r["duration_s"] == pytest.approx({"one_sample": 1 / SR, "half_second": 0.5}[name])
    assert same_vector(r["vector"], by_hand["vector"])
    assert_good_files_intact(runs)


def test_eight_channels_are_averaged(runs):
    r = row(runs, "formats/8ch.wav")
    assert r["flags"] == 0
    np.testing.assert_array_equal(r["vector"], row(runs, "ref/tone.wav")["vector"])
    channels = _column(runs, "formats/8ch.wav", "channels")
    assert channels == 8
    assert_good_files_intact(runs)


def _column(runs, key, dataset):
    for shard in sorted(runs["out"].glob("shard-*.h5")):
        with h5py.File(shard, "r") as f:
            paths = list(f["path"].asstr()[:])
            if key in paths:
                return f[dataset][paths.index(key)]
    raise KeyError(key)


def test_192_khz(runs):
    """Resampled to 16 kHz (torchaudio's sinc resampler): the vector of the same audio
    resampled by hand, and close to the 16 kHz original it was made from."""
    r = row(runs, "formats/192k.wav")
    assert r["sample_rate"] == 192000 and r["duration_s"] == pytest.approx(2.0)
    assert same_vector(r["vector"], row(runs, "ref/192k_resampled_by_hand.wav")["vector"])
    assert rel(r["vector"], row(runs, "ref/tone.wav")["vector"]) < 0.05  # resampled twice
    assert_good_files_intact(runs)


def test_8_bit_unsigned(runs):
    r = row(runs, "formats/u8.wav")
    assert rel(r["vector"], row(runs, "ref/tone.wav")["vector"]) < 0.1  # 8-bit quantisation
    assert_good_files_intact(runs)


def test_float64(runs):
    r = row(runs, "formats/f64.wav")
    np.testing.assert_array_equal(r["vector"], row(runs, "ref/tone.wav")["vector"])
    assert_good_files_intact(runs)


def test_all_zero_audio_is_processed_and_flagged_silent(runs):
    r = row(runs, "content/silent.wav")
    assert r["flags"] == 2 and np.isfinite(r["vector"]).all()
    assert runs["info"]["flags"]["silent"] == 1
    assert_good_files_intact(runs)


def test_clipped_audio_with_dc_offset_is_processed_and_flagged(runs):
    r = row(runs, "content/clipped_dc.wav")
    assert r["flags"] == 8 and np.isfinite(r["vector"]).all()
    assert_good_files_intact(runs)


def test_mp3_with_id3_tag(runs):
    tagged, plain = row(runs, "formats/id3.mp3"), row(runs, "formats/plain.mp3")
    np.testing.assert_array_equal(tagged["vector"], plain["vector"])  # the tag changes nothing
    assert tagged["duration_s"] == pytest.approx(2.0, abs=0.1)
    assert rel(tagged["vector"], row(runs, "ref/tone.wav")["vector"]) < 0.2  # lossy
    assert_good_files_intact(runs)


def test_unreadable_permissions(runs):
    if runs["why_not"]:
        pytest.skip(runs["why_not"])
    assert_reported(runs, "bad/locked.wav")
    entry = assert_reported(runs, "bad/locked_dir")
    assert "Permission denied" in entry["message"]


def test_broken_symlink(runs):
    assert_reported(runs, "bad/dangling.wav")


def test_symlink_loops(runs):
    assert_reported(runs, "bad/loop_a.wav")
    assert_reported(runs, "bad/loop_b.wav")
    # a directory loop (bad/dirloop/up -> ..) is walked once: no row twice, nothing reported
    keys = list(runs["vectors"]) + [f["path"] for f in runs["info"]["failures"]]
    assert len(keys) == len(set(keys))
    assert not any("dirloop" in k for k in keys)


def test_directory_named_like_audio(runs):
    """Walked as the directory it is (its files are processed); named as a file, it is reported."""
    assert "x.wav/inside.wav" in runs["vectors"]
    assert_reported(runs, "../../mixed/x.wav")


def test_non_utf8_file_name(runs):
    key = "names/latin1-caf\\xe9.wav"
    assert key in runs["vectors"] and key in runs["clean_vectors"]
    with h5py.File(next(runs["out"].glob("shard-*.h5")), "r") as f:
        assert f["path"].dtype == h5py.string_dtype("utf-8")
    key.encode("utf-8")  # valid UTF-8, stored as such
    assert_good_files_intact(runs)


def test_names_with_spaces_newlines_commas_quotes(runs):
    """Walked in the mixed run, listed NUL-separated on stdin (--null) in the clean run."""
    for key in ("names/with space.wav", "names/new\nline.wav", "names/a,b,c.wav",
                'names/double"quote.wav', "names/single'quote.wav", "names/ünïcödé ☃.wav",
                "names/-o dash.wav"):
        assert key in runs["vectors"] and key in runs["clean_vectors"], key
    assert_good_files_intact(runs)


def test_same_basename_in_two_subdirectories(runs):
    one, two = runs["vectors"]["dup/one/same.wav"], runs["vectors"]["dup/two/same.wav"]
    assert rel(one, two) > 0.01  # two rows, each with its own audio
    assert_good_files_intact(runs)


def test_file_listed_then_gone(runs):
    """The file list names a file that no longer exists when decoding starts: the subprocess
    equivalent of a deletion between discovery and decoding (see also the in-process test)."""
    assert_reported(runs, "../../gone/deleted_after_listing.wav")


def test_retry_failed_reattempts_only_failed_files(runs, tmp_path):
    """Repair one bad file, retry: only the failed files are decoded again, the repaired one is
    committed, the others stay failed with the same reasons, good rows are untouched."""
    out = tmp_path / "out"
    shutil.copytree(runs["out"], out, symlinks=True)
    repaired = runs["mixed"] / "bad" / "nan.wav"
    original = repaired.read_bytes()
    repaired.write_bytes(wav_bytes(tone(1.0, freq=900, seed=40)))
    try:
        result = cli("extract", "../../mixed", "--files-from", runs["listing"], *runs["args"],
                     "-o", out, "--retry-failed", cwd=runs["deep"], preexec=runs["preexec"])
    finally:
        repaired.write_bytes(original)
    assert result.returncode == 3, result.stderr
    s = summary(result)
    expected = runs["expected"]
    discover_stage = [k for k, v in expected.items() if v[0] == "discover"]
    assert s["extracted"] == 1
    # decoded again: every failed file but the repaired one; discovery finds its own failures
    # again (broken links, loops, unlistable directories) and they stay recorded once
    assert s["failed"] == len(expected) - len(discover_stage) - 1
    assert s["failed_total"] == len(expected) - 1
    assert s["skipped"] == len(runs["vectors"])
    again = vectors(out)
    assert "bad/nan.wav" in again
    for key, vector in runs["vectors"].items():
        np.testing.assert_array_equal(again[key], vector)
    report = info_json(out)
    assert report["failed"] == len(expected) - 1
    assert "bad/nan.wav" not in {f["path"] for f in report["failures"]}


# ---- cases that need a run of their own --------------------------------------------------------

def test_empty_input_directory(tmp_path, weights):
    """Nothing to do is not an error (exit 0: every file, all none of them, done), but it is
    said: a warning names the inputs and what was passed over."""
    empty, no_audio = tmp_path / "empty", tmp_path / "no_audio"
    empty.mkdir()
    write(no_audio / "readme.txt", b"no audio here")
    out = tmp_path / "out"
    result = cli("extract", empty, no_audio, "-m", "vggish", "-w", weights, "-o", out, "-q")
    assert result.returncode == 0, result.stderr
    s = summary(result)
    assert (s["status"], s["files"], s["extracted"], s["failed_total"]) == ("complete", 0, 0, 0)
    assert "warning: no audio files found in" in result.stderr and str(empty) in result.stderr
    assert "1 other file(s) skipped" in result.stderr and ".wav" in result.stderr
    assert not list(out.glob("shard-*.h5"))
    assert info_json(out)["committed"] == 0


@pytest.mark.parametrize("how", ["read-only directory", "inside a file"])
def test_output_directory_not_writable(tmp_path, weights, how):
    """Fatal (exit 1), said before the weights are even loaded, nothing written anywhere."""
    inputs = tmp_path / "in"
    write(inputs / "tone.wav", wav_bytes(REF, subtype="FLOAT"))
    preexec = None
    if how == "read-only directory":
        preexec, why_not = unprivileged()
        if why_not:
            pytest.skip(why_not)
        out = tmp_path / "read_only"
        out.mkdir()
        out.chmod(0o555)
        words = f"the output directory {out} is not writable"
    else:
        write(tmp_path / "a_file", b"")
        out = tmp_path / "a_file" / "out"
        words = (f"cannot create the output directory {out}: {tmp_path / 'a_file'} is not a "
                 "directory")
    before = snapshot(tmp_path, skip=tmp_path / "none")
    try:
        result = cli("extract", inputs, "-m", "vggish", "-w", weights, "-o", out, preexec=preexec)
        after = snapshot(tmp_path, skip=tmp_path / "none")
    finally:
        if how == "read-only directory":
            out.chmod(0o755)
    assert result.returncode == 1, result.stderr
    assert words in result.stderr, result.stderr
    assert "hint:" in result.stderr and "Traceback" not in result.stderr
    assert result.stdout == ""
    assert after == before


def test_help_documents_exit_codes():
    from click.testing import CliRunner

    from fusefeat.cli import main

    text = " ".join(CliRunner().invoke(main, ["extract", "--help"]).output.split())
    for words in ("0 all files done", "1 fatal error", "disk full", "2 bad arguments",
                  "3 completed but some files failed", "--retry-failed", "fusefeat info DIR",
                  "75 interrupted, resumable"):
        assert words in text, words


def _truncated_copy(source: Path, target: Path) -> Path:
    with open(source, "rb") as handle:
        target.write_bytes(handle.read(8 << 20))  # the first 8 MiB of a 275 MiB zip archive
    return target


ARGUMENT_CASES = {
    # case: (arguments, exit code, words of the message)
    "unknown model": (["-m", "vggishh"], 2, "unknown model 'vggishh'"),
    "--layers out of range": (["-m", "vggish", "--layers", "10,99"], 2, "vggish has no layer 99"),
    "--layers malformed": (["-m", "vggish", "--layers", "10;15"], 2,
                           "'10;15' is not a layer number, a range A..B, or 'all'"),
    "--layers empty range": (["-m", "vggish", "--layers", "15..10"], 2, "is empty"),
    "--layers counted back too far": (["-m", "vggish", "--layers=-30"], 2, "counts back past"),
    "weights missing": (["-m", "vggish", "-w", "{tmp}/nope.pth"], 1, "weights file not found"),
    "weights of another model": (["-m", "vggish", "-w", "{cnn14}"], 1,
                                 "is not a vggish checkpoint"),
    "corrupted weights": (["-m", "vggish", "-w", "{truncated}"], 1, "corrupt"),
}


@pytest.mark.parametrize("case", list(ARGUMENT_CASES))
def test_bad_arguments_and_weights(tmp_path, random_checkpoints, case):
    """Fatal before any file is touched: the documented exit code, a message that names the
    problem and how to fix it, no traceback, nothing written (not even the output directory)."""
    args, code, words = ARGUMENT_CASES[case]
    inputs = tmp_path / "in"
    write(inputs / "tone.wav", wav_bytes(REF, subtype="FLOAT"))
    fill = {"tmp": tmp_path}
    if "{cnn14}" in args:
        fill["cnn14"] = random_checkpoints("cnn14")
    if "{truncated}" in args:
        fill["truncated"] = _truncated_copy(random_checkpoints("vggish"), tmp_path / "cut.pth")
    args = [a.format(**fill) for a in args]
    out = tmp_path / "out"
    # the real command, in this process (no interpreter and torch start per case)
    from click.testing import CliRunner

    from fusefeat.cli import main

    result = CliRunner().invoke(main, ["extract", str(inputs), *args, "-o", str(out)])
    assert result.exit_code == code, (result.output, result.exception)
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)
    assert words in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert not out.exists()


def _mount_tmpfs(path: Path, size: str) -> str | None:
    """Mount a tmpfs of `size` at path; the reason it cannot be done, or None."""
    if os.geteuid() != 0:
        return "mounting a small tmpfs needs root"
    if not shutil.which("mount"):
        return "no mount command"
    path.mkdir(exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        return f"cannot mount a tmpfs here: {result.stderr.strip() or result.returncode}"
    return None


def _file_size_limit(limit: int):
    def preexec():  # in the child: writes past `limit` bytes fail with EFBIG instead of a signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


def _committed_state(out: Path) -> tuple[int, int, dict]:
    """(rows, error records, {shard: bytes}) of the committed shards, each checked with h5py."""
    rows = errors = 0
    shards = {}
    for shard in sorted(out.glob("shard-*.h5")):
        with h5py.File(shard, "r") as f:
            assert int(f.attrs["complete"]) == 1
            assert f["embeddings"].shape[0] == int(f.attrs["rows"]) == f["path"].shape[0]
            assert np.isfinite(f["embeddings"][:]).all()
            rows += int(f.attrs["rows"])
            errors += int(f.attrs["errors"])
        shards[shard.name] = shard.read_bytes()
    return rows, errors, shards


@pytest.mark.parametrize("how", ["tmpfs", "ulimit -f"])
def test_disk_full_during_a_write(tmp_path, runs, how):
    """The disk fills up (a 3 MB tmpfs) or a write passes the file size limit (ulimit -f) in the
    middle of a run: a fatal error naming the output directory and the cause (exit 1), the open
    shard dropped, every shard committed before intact; the same command then resumes and ends
    with every good file's clean-run vector."""
    bad = [write(tmp_path / "bad" / f"{i}.wav", b"not audio, sorted first\n") for i in range(4)]
    good = sorted(p.relative_to(runs["clean"]) for p in runs["clean"].rglob("*")
                  if p.is_file() and p.relative_to(runs["clean"]).parts[0] in
                  ("names", "dup", "speech"))
    keys = [fusefeat_key(os.fsencode(p)) for p in good]
    clean_vectors = {key: runs["clean_vectors"][key] for key in keys}
    names = [os.fsencode(p) for p in good]
    listing = b"\0".join([os.fsencode(p) for p in bad] + names) + b"\0"
    # shards of 4 records: the 4 failures first (a small shard), then ~1.1 MB shards of rows
    args = ["extract", "--files-from", "-", "--null", *runs["model_args"], "--shard-size", "4"]
    preexec = None
    if how == "tmpfs":
        mount = tmp_path / "mnt"
        why_not = _mount_tmpfs(mount, "3m")
        if why_not:
            pytest.skip(why_not)
        out = mount / "out"
    else:
        out = tmp_path / "out"
        preexec = _file_size_limit(512 * 1024)
    try:
        full = cli(*args, "-o", out, cwd=runs["clean"], stdin=listing, preexec=preexec)
        assert full.returncode == 1, full.stdout + full.stderr
        reason = {"tmpfs": "No space left on device", "ulimit -f": "File too large"}[how]
        assert f"cannot write to the output directory {out}: {reason}" in full.stderr
        assert "run the same command again to resume" in full.stderr
        assert "Traceback" not in full.stderr and full.stdout == ""
        assert not list(out.glob(".tmp.*")), "the open shard was left behind"
        rows, errors, shards = _committed_state(out)
        assert errors == 4 and (rows > 0 if how == "tmpfs" else rows == 0)
        if how == "tmpfs":
            subprocess.run(["mount", "-o", "remount,size=64m", str(mount)], check=True)
        again = cli(*args, "-o", out, cwd=runs["clean"], stdin=listing)
        assert again.returncode == 3, again.stderr
        s = summary(again)
        assert s["skipped"] == rows + errors
        assert s["extracted"] == len(good) - rows
        assert s["failed_total"] == 4 and s["failed"] == 0
        for name, data in shards.items():  # committed before the failure: untouched
            assert (out / name).read_bytes() == data
        got = vectors(out)
        assert set(got) == set(clean_vectors) and len(got) == 12
        for key, vector in clean_vectors.items():
            assert same_vector(got[key], vector), key
    finally:
        if how == "tmpfs":
            subprocess.run(["umount", str(mount)], capture_output=True)


def test_file_deleted_between_discovery_and_decoding(tmp_path, runs, weights, monkeypatch):
    """In-process, so that the deletions happen at exact moments: one file right after
    discovery listed it, one right after decoding probed it (before its samples are read)."""
    import torch

    from fusefeat import audio, discover

    inputs = tmp_path / "in"
    keep = ["speech/0_george_0.wav", "ref/tone.wav"]
    for key in keep:
        write(inputs / key, (runs["clean"] / key).read_bytes())
    after_discovery = write(inputs / "gone" / "after_discovery.wav", wav_bytes(tone(1.0)))
    after_probe = write(inputs / "gone" / "after_probe.wav", wav_bytes(tone(1.0)))
    real_discover, real_probe = discover.discover, audio.probe

    def discover_then_delete(*args, **kwargs):
        found = real_discover(*args, **kwargs)
        after_discovery.unlink()
        return found

    def probe_then_delete(path):
        info = real_probe(path)
        if path == str(after_probe):
            after_probe.unlink()
        return info

    monkeypatch.setattr(discover, "discover", discover_then_delete)
    monkeypatch.setattr(audio, "probe", probe_then_delete)
    grad = torch.is_grad_enabled()
    try:
        s = fusefeat.extract([str(inputs)], model="vggish", weights=str(weights),
                             out=str(tmp_path / "out"), num_workers=0, progress=False,
                             window_seconds=2.0)
    finally:
        torch.set_grad_enabled(grad)
    assert (s.status, s.exit_code, s.extracted, s.failed) == ("partial", 3, 2, 2)
    feats = fusefeat.load(tmp_path / "out")
    errors = {e.path: e for e in feats.errors}
    assert set(errors) == {"gone/after_discovery.wav", "gone/after_probe.wav"}
    for key, words in (("gone/after_discovery.wav", "deleted or moved after it was listed"),
                       ("gone/after_probe.wav", "deleted or moved while fusefeat was reading")):
        assert (errors[key].stage, errors[key].error_type) == ("decode", "FileNotFound")
        assert words in errors[key].message
    assert feats.paths == sorted(keep)
    for i, key in enumerate(feats.paths):
        assert same_vector(np.asarray(feats.embeddings[i]), runs["clean_vectors"][key])
    feats.close()


# ---- a one-hour file ---------------------------------------------------------------------------

EXAMPLE = 15360  # one VGGish example (0.96 s at 16 kHz)
HOUR_BYTES_FLOAT32 = 3600 * SR * 4  # the decoded hour as float32: 230 MB


@pytest.fixture(scope="module")
def hour_files(tmp_path_factory):
    """A one-hour 16 kHz file whose signal repeats every 0.96 s (tone + noise), written in blocks
    so that the test itself stays light; every VGGish example of it is the same, so its vector
    equals that of a 9.6 s clip of the same pattern."""
    root = tmp_path_factory.mktemp("hour")
    t = np.arange(EXAMPLE) / SR
    pattern = (0.3 * np.sin(2 * np.pi * 437.5 * t)
               + 0.05 * np.random.default_rng(5).standard_normal(EXAMPLE)).astype(np.float32)
    block = np.tile(pattern, 125)  # 120 s
    with sf.SoundFile(root / "hour.wav", "w", SR, 1, "PCM_16") as handle:
        for _ in range(3750 // 125):
            handle.write(block)
    sf.write(root / "pattern_9.6s.wav", np.tile(pattern, 10), SR, subtype="PCM_16")
    sf.write(root / "two_windows.wav", block, SR, subtype="PCM_16")
    return root / "hour.wav", root / "pattern_9.6s.wav", root / "two_windows.wav"


def _tree_rss(pid: int, count: bool = False):
    """Resident bytes of a process and all its descendants (decode workers included); with
    `count`, also how many processes that is."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as handle:
                    ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(name))
    total, stack, processes = 0, [pid], 0
    while stack:
        current = stack.pop()
        try:
            with open(f"/proc/{current}/status") as handle:
                total += next(int(line.split()[1]) * 1024 for line in handle
                              if line.startswith("VmRSS:"))
            processes += 1
        except (OSError, StopIteration):
            pass
        stack += children.get(current, [])
    return (total, processes) if count else total


class PeakRSS:
    """Polls the resident memory of a process tree every 50 ms; `peak` is the largest sum,
    `peak_with_children` the largest while the process had children (for fusefeat extract:
    while decoding and computing, after the weights were loaded)."""

    def __init__(self, pid: int):
        self.pid, self.peak, self.peak_with_children = pid, 0, 0
        self.working = []  # resident bytes sampled while the process had children
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            rss, processes = _tree_rss(self.pid, count=True)
            self.peak = max(self.peak, rss)
            if processes > 1:
                self.peak_with_children = max(self.peak_with_children, rss)
                self.working.append(rss)
            self._stop.wait(0.05)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def _cli_with_peak_rss(*args, timeout=1800):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"), HF_HUB_OFFLINE="1")
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "fusefeat", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    poller = PeakRSS(proc.pid)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        poller.stop()
        if proc.poll() is None:
            proc.kill()
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), poller, \
        time.monotonic() - start


DECODE_ONLY = r"""
import sys, time
from fusefeat.loader import DecodePool, DecodeTask, Segment
from fusefeat.windows import Geometry

# VGGish's geometry with its default 59.52 s windows
geometry = Geometry(sample_rate=16000, window=62 * 15360, align=15360, context=0, lookahead=240,
                    min_samples=15600)
segments = samples = 0
for message in DecodePool([DecodeTask(0, "hour", sys.argv[1])], geometry, workers=1):
    assert isinstance(message, Segment), message
    segments += 1
    samples += message.wave.size
    time.sleep(0.1)  # a consumer slower than decoding, as the model is
print(segments, samples, flush=True)
"""


def _decode_only_peak_rss(path: Path) -> tuple[int, int, int]:
    """(peak resident bytes of the process tree, segments, samples) of decoding `path` with
    VGGish's windows and a slow consumer, in a fresh interpreter."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", DECODE_ONLY, str(path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    poller = PeakRSS(proc.pid)
    try:
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        peak = poller.stop()
    assert proc.returncode == 0, stderr
    segments, samples = map(int, stdout.split()[-2:])
    return peak, segments, samples


def test_long_file_decoding_holds_bounded_memory(hour_files):
    """The decode side of a one-hour file: its worker runs ahead of a slow consumer by a bounded
    amount of audio (credits per MiB of decoded samples), never by the whole hour. Compared with
    the same decoding of a two-window file, the hour costs far less than itself (230 MB)."""
    hour, _, two_windows = hour_files
    base_peak, base_segments, _ = _decode_only_peak_rss(two_windows)
    peak, segments, samples = _decode_only_peak_rss(hour)
    assert base_segments == 2
    assert segments == 60 and samples >= 3600 * SR  # windows read a little look-ahead
    growth = peak - base_peak
    print(f"\ndecoding a one-hour file with a slow consumer: peak RSS {peak / 2**20:.0f} MiB, "
          f"{growth / 2**20:.0f} MiB more than for a two-window file")
    assert growth < HOUR_BYTES_FLOAT32 / 2, f"{growth / 2**20:.0f} MiB more than for 2 windows"


def _slow_tests_affordable() -> str | None:
    """Why the one-hour extraction is skipped, or None to run it: it takes ~2 min on 2 CPU
    cores. It runs with FUSEFEAT_SLOW=1, on a CUDA machine, or from 8 CPU cores."""
    wanted = os.environ.get("FUSEFEAT_SLOW")
    if wanted == "1":
        return None
    if wanted == "0":
        return "FUSEFEAT_SLOW=0"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    import torch

    if torch.cuda.is_available() or (cores or 1) >= 8:
        return None
    return (f"a one-hour extraction takes ~2 min on 2 CPU cores ({cores} here); it runs by "
            "default from 8 cores or on a GPU, or with FUSEFEAT_SLOW=1")


@pytest.mark.slow
def test_one_hour_file(hour_files, weights, tmp_path):
    """The whole CLI on a one-hour file: windows of 9.6 s, batches of one window, so that the
    working set of the model is small next to the hour; the peak resident memory of the whole
    process tree (decode worker included) must exceed that of a run on a 9.6 s clip by far less
    than the decoded hour alone (230 MB as float32), over the whole run and while decoding and
    computing; and the vector must equal the 9.6 s clip's (every 0.96 s example of the hour is
    the same)."""
    why_not = _slow_tests_affordable()
    if why_not:
        pytest.skip(why_not)
    hour, pattern, _ = hour_files
    args = ["extract", "-m", "vggish", "-w", weights, "--layers", "3,6", "--window-seconds", "10",
            "--batch-seconds", "10", "--num-workers", "1", "-q"]
    base, base_rss, base_seconds = _cli_with_peak_rss(*args, pattern, "-o", tmp_path / "base")
    assert base.returncode == 0, base.stderr
    result, rss, seconds = _cli_with_peak_rss(*args, hour, pattern, "-o", tmp_path / "hour")
    assert result.returncode == 0, result.stderr
    mib = 2 ** 20
    print(f"\none-hour file: {seconds:.1f} s, peak RSS {rss.peak / mib:.0f} MiB (while decoding "
          f"and computing: {rss.peak_with_children / mib:.0f} MiB); 9.6 s clip: "
          f"{base_seconds:.1f} s, peak RSS {base_rss.peak / mib:.0f} MiB (while decoding and "
          f"computing: {base_rss.peak_with_children / mib:.0f} MiB)")
    feats = fusefeat.load(tmp_path / "hour")
    hour_row, pattern_row = feats.paths.index(str(hour)), feats.paths.index(str(pattern))
    assert feats.duration_s[hour_row] == 3600.0 and feats.flags[hour_row] == 0
    vector = np.asarray(feats.embeddings[hour_row])
    assert np.isfinite(vector).all()
    assert rel(vector, np.asarray(feats.embeddings[pattern_row])) < 1e-5
    feats.close()
    # The peak of a whole run is loading the weights (both runs alike); what the hour could add
    # shows while decoding and computing. Bounded: less than the decoded hour on top of a run
    # of 9.6 s, and no growth from the first third of the hour to the last.
    assert rss.peak - base_rss.peak < HOUR_BYTES_FLOAT32 / 2
    assert rss.peak_with_children - base_rss.peak_with_children < HOUR_BYTES_FLOAT32
    third = len(rss.working) // 3
    early, late = max(rss.working[:third]), max(rss.working[-third:])
    print(f"while working: first third {early / mib:.0f} MiB, last third {late / mib:.0f} MiB")
    assert late - early < 64 * mib


ORPHAN = r"""
import sys, time
from fusefeat.loader import DecodePool, DecodeTask
from fusefeat.windows import Geometry

geometry = Geometry(sample_rate=16000, window=62 * 15360, align=15360, context=0, lookahead=240,
                    min_samples=15600)
tasks = [DecodeTask(i, str(i), sys.argv[1]) for i in range(200)]
for message in DecodePool(tasks, geometry, workers=1):
    print("first", flush=True)
    time.sleep(600)  # never takes more: the worker fills its credits and the pipe, then waits
"""


def test_killed_run_leaves_no_decoder_behind(tmp_path):
    """SIGKILL of the main process while its decode worker has more queued for it than a pipe
    holds: the orphaned worker must still exit (before, it waited forever to write into the pipe
    nobody reads, and kept the caller's stdout open)."""
    clip = write(tmp_path / "clip.wav", wav_bytes(tone(2.0)))  # 128 KB decoded: 2 pipes' worth
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", ORPHAN, str(clip)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "first", proc.stderr.read()
    time.sleep(1.0)  # the worker decodes ahead up to its credits
    workers = _descendants(proc.pid)
    assert workers
    proc.kill()
    try:
        proc.communicate(timeout=30)  # returns once every holder of its stdout (workers) is gone
    except subprocess.TimeoutExpired:
        for pid in workers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.communicate()
        pytest.fail("an orphaned decode worker did not exit")


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as handle:
                    children.setdefault(int(handle.read().rsplit(")", 1)[1].split()[1]),
                                        []).append(int(name))
            except (OSError, ValueError, IndexError):
                continue
    found, stack = [], list(children.get(pid, []))
    while stack:
        current = stack.pop()
        found.append(current)
        stack += children.get(current, [])
    return found
