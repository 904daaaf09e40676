"""Tests for the built-in default sound pool (finelap.demo.corpus, `finelap corpus`).

Real renders need fluidsynth + a GM soundfont and espeak-ng (Debian: scripts/system_deps.sh);
those tests skip with the reason when the tools are absent. The fallback, determinism and reuse
tests use the procedural sources, which need nothing outside Python.
"""
from __future__ import annotations

import argparse
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from finelap.demo import corpus as C
from finelap.data.manifests import read_manifest
from finelap.errors import ConfigError, FinelapError

TOOLS = C.detect_tools(available_tools=list(C.TOOLS))
need_midi = pytest.mark.skipif(not TOOLS.midi_ok, reason="fluidsynth or a GM soundfont is not installed "
                               "(sudo apt-get install fluidsynth fluid-soundfont-gm)")
need_speech = pytest.mark.skipif(not TOOLS.speech_ok, reason="espeak-ng is not installed (sudo apt-get install espeak-ng)")


# ----------------------------------------------------------------------------- an independent SMF reader


def _read_vlq(b: bytes, i: int) -> tuple[int, int]:
    v = 0
    while True:
        c = b[i]
        i += 1
        v = (v << 7) | (c & 0x7F)
        if not c & 0x80:
            return v, i


def _parse_smf(b: bytes) -> tuple[tuple[int, int, int], list[tuple[int, bytes]]]:
    """(format, ntracks, division), [(absolute tick, message)] of the single track."""
    assert b[:4] == b"MThd"
    hlen, fmt, ntrk, div = struct.unpack(">IHHH", b[4:14])
    assert hlen == 6
    assert b[14:18] == b"MTrk"
    (tlen,) = struct.unpack(">I", b[18:22])
    track = b[22 : 22 + tlen]
    assert len(track) == tlen and 22 + tlen == len(b), "track length must match the bytes that follow"
    i, tick, events = 0, 0, []
    while i < len(track):
        delta, i = _read_vlq(track, i)
        tick += delta
        status = track[i]
        if status == 0xFF:
            mlen, j = _read_vlq(track, i + 2)
            msg, i = track[i : j + mlen], j + mlen
        else:
            n = 2 if (status & 0xF0) in (0xC0, 0xD0) else 3
            msg, i = track[i : i + n], i + n
        events.append((tick, bytes(msg)))
    return (fmt, ntrk, div), events


def test_vlq_matches_the_smf_spec_examples():
    # examples from the Standard MIDI File 1.0 specification
    cases = {0: "00", 0x40: "40", 0x7F: "7F", 0x80: "8100", 0x2000: "C000", 0x3FFF: "FF7F",
             0x4000: "818000", 0x100000: "C08000", 0x1FFFFF: "FFFF7F", 0x200000: "81808000", 0x0FFFFFFF: "FFFFFF7F"}
    for value, hexstr in cases.items():
        enc = C._vlq(value)
        assert enc.hex().upper() == hexstr
        assert _read_vlq(enc, 0) == (value, len(enc))


def test_smf_writer_header_track_and_note_timing():
    notes = [C.MidiNote(0.0, 0.5, 60, 100), C.MidiNote(0.5, 0.25, 60, 90), C.MidiNote(0.25, 1.0, 67, 80, channel=1),
             C.MidiNote(0.1, 0.1, 38, 127, channel=C.DRUM_CHANNEL)]
    b = C.notes_to_smf(notes, {0: (0, 40), 1: (8, 14), C.DRUM_CHANNEL: (128, 16)}, end_s=3.0)
    (fmt, ntrk, div), ev = _parse_smf(b)
    assert (fmt, ntrk, div) == (0, 1, 480)
    assert ev[0] == (0, b"\xff\x51\x03" + (500000).to_bytes(3, "big"))  # 120 bpm: 960 ticks per second
    assert ev[-1] == (2880, b"\xff\x2f\x00"), "End of Track at end_s"
    assert (0, bytes([0xB0, 0, 0])) in ev and (0, bytes([0xC0, 40])) in ev
    assert (0, bytes([0xB1, 0, 8])) in ev and (0, bytes([0xC1, 14])) in ev
    assert (0, bytes([0xC9, 16])) in ev and not any(m[:1] == b"\xb9" for _, m in ev), "kit by program, no bank select on ch 10"
    ons = [(t, m[0] & 0x0F, m[1], m[2]) for t, m in ev if m[0] & 0xF0 == 0x90]
    offs = [(t, m[0] & 0x0F, m[1]) for t, m in ev if m[0] & 0xF0 == 0x80]
    assert sorted(ons) == [(0, 0, 60, 100), (96, 9, 38, 127), (240, 1, 67, 80), (480, 0, 60, 90)]
    assert sorted(offs) == [(192, 9, 38), (480, 0, 60), (720, 0, 60), (1200, 1, 67)]
    # the repeated key 60 is released before it is struck again at the same tick
    at480 = [m for t, m in ev if t == 480]
    assert at480.index(bytes([0x80, 60, 0])) < at480.index(bytes([0x90, 60, 90]))
    assert [t for t, _ in ev] == sorted(t for t, _ in ev)


@pytest.mark.parametrize("note", [C.MidiNote(0, 1, 128), C.MidiNote(0, 1, 60, 0), C.MidiNote(-1, 1, 60),
                                  C.MidiNote(0, 0, 60), C.MidiNote(0, 1, 60, 100, 16)])
def test_smf_writer_rejects_out_of_range(note):
    with pytest.raises(ValueError):
        C.notes_to_smf([note])


def _fake_sf2(path: Path, presets: list[tuple[str, int, int]]) -> None:
    def chunk(cid: bytes, data: bytes) -> bytes:
        return cid + struct.pack("<I", len(data)) + data + (b"\0" if len(data) & 1 else b"")

    recs = b"".join(struct.pack("<20sHHHIII", n.encode(), p, b, i, 0, 0, 0) for i, (n, b, p) in enumerate(presets))
    recs += struct.pack("<20sHHHIII", b"EOP", 0, 0, len(presets), 0, 0, 0)
    info = chunk(b"LIST", b"INFO" + chunk(b"ifil", struct.pack("<HH", 2, 1)) + chunk(b"INAM", b"test\0"))
    sdta = chunk(b"LIST", b"sdta" + chunk(b"smpl", b"\0" * 101))  # odd size: exercises the pad byte
    pdta = chunk(b"LIST", b"pdta" + chunk(b"phdr", recs) + chunk(b"pbag", b"\0" * 4))
    body = b"sfbk" + info + sdta + pdta
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)


def test_read_sf2_presets(tmp_path):
    p = tmp_path / "t.sf2"
    _fake_sf2(p, [("Violin", 0, 40), ("Rain", 1, 122), ("Standard", 128, 0)])
    assert C.read_sf2_presets(p) == {(0, 40): "Violin", (1, 122): "Rain", (128, 0): "Standard"}
    bad = tmp_path / "bad.sf2"
    bad.write_bytes(b"RIFF\x04\x00\x00\x00WAVE")
    with pytest.raises(FinelapError, match="bad.sf2.*not a SoundFont"):
        C.read_sf2_presets(bad)


def test_variation_classes_need_the_real_preset(tmp_path):
    """A soundfont without GS 'Rain' must not render Seashore under the label 'rain falling'."""
    ts = C.Toolset(fluidsynth="fluidsynth", soundfont=tmp_path / "x.sf2",
                   presets={(0, 122): "Seashore", (1, 122): "Wind", (128, 0): "Standard"})
    by = {c.slug: c for c in C.default_classes()}
    assert C._availability(by["seashore"], ts) is None
    assert C._availability(by["kick_drum"], ts) is None
    assert "no preset" in C._availability(by["violin"], ts)
    assert "not 'rain'" in C._availability(by["rain"], ts)
    assert "no preset" in C._availability(by["thunder"], ts)


def test_energy_bounds_finds_the_audible_part():
    sr = 16000
    x = np.zeros(sr * 2, np.float32)
    x[8000:24000] = 0.5 * np.sin(2 * np.pi * 440 * np.arange(16000) / sr)
    x[:8000] = 1e-6  # far below -40 dB relative: counts as silence
    start, end = C.energy_bounds(x, sr)
    assert abs(start - 8000) <= 160 and abs(end - 24000) <= 160
    assert C.energy_bounds(np.zeros(sr, np.float32), sr) is None


# ----------------------------------------------------------------------------- real renders


def _check_clip(clip, sr=16000):
    y, file_sr = sf.read(clip.audio, dtype="float32")
    assert file_sr == sr and y.ndim == 1
    assert sf.info(clip.audio).format == "FLAC"
    assert 1.0 - 1e-6 <= clip.duration <= 4.0 + 1e-6 and len(y) == pytest.approx(clip.duration * sr, abs=1)
    (ev,) = clip.events
    assert ev.label == clip.labels[0] and 0 < ev.onset < ev.offset <= clip.duration
    a, b = int(round(ev.onset * sr)), int(round(ev.offset * sr))
    inside = np.sqrt(np.mean(y[a:b] ** 2))
    assert inside > 1e-2, "the event is audible"
    outside = np.concatenate([y[:a], y[b:]])
    assert np.abs(outside).max() < 1e-3, "no sound outside the labelled span"


@need_midi
@need_speech
def test_render_instrument_and_speech(tmp_path):
    res = C.build_corpus(tmp_path / "pool", per_class=1, seed=3, classes=["violin", "a woman speaking"], say=lambda m: None)
    assert not res.reused and not res.synthetic
    clips = read_manifest(res.manifest)
    assert [c.labels for c in clips] == [["a violin playing"], ["a woman speaking"]]
    assert [c.meta["source"] for c in clips] == ["fluidsynth", "espeak-ng"]
    for c in clips:
        _check_clip(c)
    assert (tmp_path / "pool" / "classes.txt").read_text() == "a violin playing\na woman speaking\n"
    assert (tmp_path / "pool" / "audio" / "violin" / "000.flac").exists()
    src = json.loads((tmp_path / "pool" / "sources.json").read_text())
    assert src["classes"]["violin"]["clips"] == 1 and src["tools"]["fluidsynth"]["available"]


@need_midi
def test_fluidsynth_rendering_is_deterministic():
    notes = [C.MidiNote(0.0, 0.4, 64, 100), C.MidiNote(0.4, 0.4, 67, 90)]
    midi = C.notes_to_smf(notes, {0: (0, 73)})
    a = C.render_midi(midi, TOOLS.soundfont, TOOLS.fluidsynth)
    b = C.render_midi(midi, TOOLS.soundfont, TOOLS.fluidsynth)
    assert np.abs(a).max() > 1e-3
    np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- fallback, determinism, reuse


def test_fallback_when_no_tool_is_available(tmp_path, monkeypatch):
    msgs: list[str] = []
    monkeypatch.setenv(C.TOOLS_ENV, "none")
    res = C.build_corpus(tmp_path / "p", per_class=1, say=msgs.append)
    assert res.synthetic and not res.reused
    assert sorted(res.classes) == sorted(c.label for c in C.procedural_classes())
    text = "\n".join(msgs)
    for fix in ("apt-get install -y fluidsynth", "apt-get install -y fluid-soundfont-gm", "apt-get install -y espeak-ng"):
        assert fix in text
    assert "PROCEDURALLY SYNTHESISED" in text
    for c in read_manifest(res.manifest):
        _check_clip(c)
    assert json.loads((tmp_path / "p" / "sources.json").read_text())["synthetic_fallback"] is True


def test_no_usable_source_is_a_clear_error(tmp_path):
    with pytest.raises(FinelapError, match="no sound source.*apt-get install"):
        C.build_corpus(tmp_path / "p", per_class=1, available_tools=[], synthetic="never", say=lambda m: None)
    # explicitly requested real classes are not silently swapped for procedural ones
    with pytest.raises(FinelapError, match="no sound source.*fluidsynth"):
        C.build_corpus(tmp_path / "p", per_class=1, classes=["violin"], available_tools=[], say=lambda m: None)


@need_speech
def test_partial_tools_build_what_is_available(tmp_path):
    msgs: list[str] = []
    res = C.build_corpus(tmp_path / "p", per_class=1, classes=["violin", "man_speaking"], available_tools=["espeak-ng"],
                         say=msgs.append)
    assert res.classes == ["a man speaking"] and not res.synthetic
    assert res.skipped_classes[0]["class"] == "violin" and "fluidsynth" in res.skipped_classes[0]["reason"]
    assert any("fluidsynth not found" in m and "apt-get install -y fluidsynth" in m for m in msgs)


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    kw = dict(per_class=2, classes=["high_beep", "white_noise"], available_tools=[], say=lambda m: None)
    a = C.build_corpus(tmp_path / "a", seed=7, workers=2, **kw)
    b = C.build_corpus(tmp_path / "b", seed=7, workers=1, **kw)
    c = C.build_corpus(tmp_path / "c", seed=8, workers=2, **kw)
    for name in ("manifest.jsonl", "sources.json", "classes.txt"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    for ca, cb in zip(a.clips, b.clips):
        assert Path(ca.audio).read_bytes() == Path(cb.audio).read_bytes()
    assert (tmp_path / "a" / "manifest.jsonl").read_bytes() != (tmp_path / "c" / "manifest.jsonl").read_bytes()
    assert [x.id for x in a.clips] == ["high_beep-000", "high_beep-001", "white_noise-000", "white_noise-001"]


def test_reuse_when_config_matches_rebuild_when_not(tmp_path):
    msgs: list[str] = []
    kw = dict(classes=["low_hum"], available_tools=[], say=msgs.append)
    first = C.build_corpus(tmp_path / "p", per_class=2, **kw)
    mtime = Path(first.clips[0].audio).stat().st_mtime_ns
    again = C.build_corpus(tmp_path / "p", per_class=2, workers=1, **kw)  # workers is not part of the config
    assert again.reused and any("reusing" in m for m in msgs)
    assert [c.id for c in again.clips] == [c.id for c in first.clips] and again.config_hash == first.config_hash
    assert Path(first.clips[0].audio).stat().st_mtime_ns == mtime
    more = C.build_corpus(tmp_path / "p", per_class=3, **kw)
    assert not more.reused and len(more.clips) == 3
    forced = C.build_corpus(tmp_path / "p", per_class=3, force=True, **kw)
    assert not forced.reused
    Path(forced.clips[1].audio).unlink()  # a damaged pool is rebuilt, not reused
    assert not C.build_corpus(tmp_path / "p", per_class=3, **kw).reused


def test_a_failing_render_is_skipped_not_fatal(tmp_path, monkeypatch):
    real = C._procedural

    def flaky(slug, rng, content_s, sr):
        if slug == "buzz":
            raise RuntimeError("simulated renderer crash")
        return real(slug, rng, content_s, sr)

    monkeypatch.setattr(C, "_procedural", flaky)
    msgs: list[str] = []
    res = C.build_corpus(tmp_path / "p", per_class=1, classes=["buzz", "clicks"], available_tools=[], say=msgs.append)
    assert res.classes == ["a ticking clicking sound"]
    assert res.skipped_clips == [{"id": "buzz-000", "reason": "RuntimeError: simulated renderer crash"}]
    assert any("skipped buzz-000" in m for m in msgs)


def test_bad_requests_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown corpus class"):
        C.build_corpus(tmp_path / "p", classes=["unicorn"], say=lambda m: None)
    with pytest.raises(ConfigError, match="unknown tool"):
        C.build_corpus(tmp_path / "p", available_tools=["sox2"], say=lambda m: None)
    with pytest.raises(ConfigError, match="per_class"):
        C.build_corpus(tmp_path / "p", per_class=0, say=lambda m: None)
    foreign = tmp_path / "q" / "audio"
    foreign.mkdir(parents=True)
    (foreign / "mine.wav").write_bytes(b"x")
    with pytest.raises(ConfigError, match="not written by finelap corpus"):
        C.build_corpus(tmp_path / "q", classes=["buzz"], available_tools=[], say=lambda m: None)
    assert (foreign / "mine.wav").exists()


def test_cli_command(tmp_path, monkeypatch, capsys):
    from finelap.commands import corpus as cmd

    monkeypatch.setenv(C.TOOLS_ENV, "none")
    parser = argparse.ArgumentParser()
    cmd.add_arguments(parser)
    out = tmp_path / "pool"
    n = len(C.procedural_classes())
    assert cmd.run(parser.parse_args(["--out", str(out), "--per-class", "1"])) == 0
    line = capsys.readouterr().out
    assert f"{n} clips in {n} classes" in line and "PROCEDURAL FALLBACK" in line and str(out / "manifest.jsonl") in line
    assert cmd.run(parser.parse_args(["--out", str(out), "--per-class", "1"])) == 0
    assert "reused" in capsys.readouterr().out
    # explicitly requested procedural classes are not a fallback
    assert cmd.run(parser.parse_args(["--out", str(out), "--per-class", "1", "--classes", "clicks,a high beep"])) == 0
    line = capsys.readouterr().out
    assert "2 clips in 2 classes" in line and "FALLBACK" not in line
    assert cmd.run(parser.parse_args(["--list"])) == 0
    listing = capsys.readouterr().out
    assert "violin" in listing and "apt-get install" in listing
