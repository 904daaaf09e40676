"""The built-in default sound pool: real-sound single-event clips rendered offline.

A new user has no data and no internet, so `make demo` builds its pool from what a Debian
machine can render locally:
- General MIDI through `fluidsynth` and a GM soundfont (Debian `fluid-soundfont-gm`):
  instruments playing short seeded phrases, drum hits on MIDI channel 10, and the GM sound
  effects (programs 121-128, 1-based: fret noise, breath, seashore, bird, telephone, helicopter,
  applause, gunshot). GS variation presets (rain, thunder, dog, siren, ...) are used only when the
  soundfont really holds them; otherwise fluidsynth would silently substitute the bank-0 sound and
  the label would lie, so those classes are skipped and listed as skipped.
- Speech from `espeak-ng`: men, women and whispering voices reading neutral sentences.
- When none of those is available: procedurally synthesised tones, chirps and noise bursts,
  labelled for what they are ("a high beep"), with a loud warning.

Every clip is one event: labels=[phrase] and events=[Event(phrase, onset, offset)] over its
non-silent part (energy trim). Clips are 16 kHz mono FLAC, deterministic given the seed: each
clip draws from its own RNG seeded by (seed, class, index), so the output does not depend on the
number of workers or on which other classes are built.

Layout written under `out`:
    audio/<class_slug>/<nnn>.flac, manifest.jsonl, classes.txt, sources.json
A second build with the same configuration reuses the pool (config hash in sources.json).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection, Iterable, Sequence

import numpy as np

from ..data.types import Clip, Event
from ..errors import AudioError, ConfigError, FinelapError
from ..utils import atomic_path, log, progress, write_json_atomic, write_text_atomic

__all__ = [
    "CORPUS_VERSION",
    "TOOLS",
    "SoundClass",
    "Toolset",
    "CorpusResult",
    "MidiNote",
    "smf_bytes",
    "notes_to_smf",
    "read_sf2_presets",
    "find_soundfont",
    "detect_tools",
    "default_classes",
    "procedural_classes",
    "render_midi",
    "render_speech",
    "energy_bounds",
    "build_corpus",
    "clip_rng",
]

# Bump when rendering or class definitions change, so old pools are rebuilt, not reused.
CORPUS_VERSION = 1
TOOLS = ("fluidsynth", "soundfont", "espeak-ng")
TOOLS_ENV = "FINELAP_CORPUS_TOOLS"  # comma list of tools to treat as available ("none" = none)
SOUNDFONT_ENV = "FINELAP_SOUNDFONT"

APT_HINT = {
    "fluidsynth": "sudo apt-get install -y fluidsynth",
    "soundfont": "sudo apt-get install -y fluid-soundfont-gm",
    "espeak-ng": "sudo apt-get install -y espeak-ng",
}

SOUNDFONT_CANDIDATES = (
    "/usr/share/sounds/sf2/FluidR3_GM.sf2",
    "/usr/share/sounds/sf2/default-GM.sf2",
    "/usr/share/soundfonts/FluidR3_GM.sf2",
    "/usr/share/soundfonts/default.sf2",
    "/usr/share/sounds/sf2/*.sf2",
    "/usr/share/soundfonts/*.sf2",
    "/usr/local/share/soundfonts/*.sf2",
    "/opt/homebrew/share/soundfonts/*.sf2",
    "~/.local/share/soundfonts/*.sf2",
)

# ----------------------------------------------------------------------------- Standard MIDI Files

TICKS_PER_BEAT = 480
TEMPO_US_PER_BEAT = 500_000  # 120 bpm, written explicitly: 1 s = 960 ticks
DRUM_CHANNEL = 9  # MIDI channel 10, 0-based


def _vlq(n: int) -> bytes:
    """MIDI variable-length quantity (7 bits per byte, high bit = more follows)."""
    if n < 0:
        raise ValueError(f"negative delta time {n}")
    out = [n & 0x7F]
    n >>= 7
    while n:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    return bytes(reversed(out))


def smf_bytes(messages: Iterable[tuple[int, bytes]], ticks_per_beat: int = TICKS_PER_BEAT) -> bytes:
    """A format-0 Standard MIDI File with one track.

    messages: (absolute tick, raw message bytes) pairs, already in the order they should play
    (stable-sorted by tick here). An End-of-Track meta event is appended after the last message.
    """
    msgs = sorted(messages, key=lambda m: m[0])
    body = bytearray()
    now = 0
    for tick, msg in msgs:
        body += _vlq(int(tick) - now) + msg
        now = int(tick)
    body += _vlq(0) + b"\xff\x2f\x00"
    header = b"MThd" + struct.pack(">IHHH", 6, 0, 1, ticks_per_beat)
    return header + b"MTrk" + struct.pack(">I", len(body)) + bytes(body)


@dataclass(frozen=True)
class MidiNote:
    """One note: start and duration in seconds, MIDI key 0-127, velocity 1-127, channel 0-15."""

    start: float
    duration: float
    key: int
    velocity: int = 100
    channel: int = 0


def notes_to_smf(
    notes: Sequence[MidiNote],
    programs: dict[int, tuple[int, int]] | None = None,
    end_s: float | None = None,
    ticks_per_beat: int = TICKS_PER_BEAT,
) -> bytes:
    """Notes -> SMF bytes at a fixed 120 bpm tempo.

    programs: channel -> (bank, program), both 0-based; emitted at tick 0 as bank select (CC0)
        plus program change. On the drum channel (10) the program picks the drum kit and no bank
        select is sent: that channel is always the percussion bank (128).
    end_s: End-of-Track time; defaults to the last note-off. fluidsynth renders ~2 s past it,
        enough for releases and reverb tails.
    Events at the same tick are ordered controls, then note-offs, then note-ons, so a repeated
    key is released before it is struck again.
    """
    tps = ticks_per_beat * 1_000_000 / TEMPO_US_PER_BEAT  # ticks per second
    msgs: list[tuple[int, int, bytes]] = [(0, 0, b"\xff\x51\x03" + TEMPO_US_PER_BEAT.to_bytes(3, "big"))]
    for ch, (bank, prog) in sorted((programs or {}).items()):
        _check_range("channel", ch, 15)
        _check_range("program", prog, 127)
        if ch != DRUM_CHANNEL:
            _check_range("bank", bank, 127)
            msgs.append((0, 0, bytes([0xB0 | ch, 0, bank])))
        msgs.append((0, 0, bytes([0xC0 | ch, prog])))
    last = 0
    for n in notes:
        _check_range("key", n.key, 127)
        _check_range("velocity", n.velocity, 127, lo=1)
        _check_range("channel", n.channel, 15)
        if n.start < 0 or n.duration <= 0:
            raise ValueError(f"note needs start >= 0 and duration > 0, got {n}")
        on = int(round(n.start * tps))
        off = max(on + 1, int(round((n.start + n.duration) * tps)))
        msgs.append((on, 2, bytes([0x90 | n.channel, n.key, n.velocity])))
        msgs.append((off, 1, bytes([0x80 | n.channel, n.key, 0])))
        last = max(last, off)
    end = last if end_s is None else max(last, int(round(end_s * tps)))
    msgs.sort(key=lambda m: (m[0], m[1]))
    ordered = [(t, b) for t, _, b in msgs]
    # the End-of-Track must sit at `end`: a no-op meta text event there pins the track length
    ordered.append((end, b"\xff\x01\x00"))
    return smf_bytes(ordered, ticks_per_beat)


def _check_range(name: str, v: int, hi: int, lo: int = 0) -> None:
    if not (lo <= int(v) <= hi):
        raise ValueError(f"MIDI {name} must be in [{lo}, {hi}], got {v}")


# ----------------------------------------------------------------------------- tools and soundfont


def read_sf2_presets(path: str | Path) -> dict[tuple[int, int], str]:
    """(bank, program) -> preset name from a SoundFont 2 file's `phdr` chunk.

    Walks the RIFF chunks with seeks, so the (large) sample data is never read.
    Raises FinelapError if the file is not a SoundFont 2.
    """
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"sfbk":
            raise FinelapError(f"{path}: not a SoundFont 2 file (no RIFF sfbk header)")
        end = 8 + struct.unpack("<I", head[4:8])[0]
        pos = 12
        while pos + 8 <= end:
            f.seek(pos)
            cid, size = struct.unpack("<4sI", f.read(8))
            if cid == b"LIST" and f.read(4) == b"pdta":
                sub, sub_end = pos + 12, pos + 8 + size
                while sub + 8 <= sub_end:
                    f.seek(sub)
                    sid, ssize = struct.unpack("<4sI", f.read(8))
                    if sid == b"phdr":
                        data = f.read(ssize)
                        presets: dict[tuple[int, int], str] = {}
                        for i in range(len(data) // 38 - 1):  # the last record is the "EOP" terminator
                            name, prog, bank = struct.unpack("<20sHH", data[i * 38 : i * 38 + 24])
                            presets[(bank, prog)] = name.split(b"\0")[0].decode("latin-1").strip()
                        return presets
                    sub += 8 + ssize + (ssize & 1)
            pos += 8 + size + (size & 1)
    raise FinelapError(f"{path}: SoundFont 2 file has no preset headers (pdta/phdr)")


def find_soundfont(explicit: str | Path | None = None) -> Path | None:
    """The GM soundfont to render with: `explicit`, then $FINELAP_SOUNDFONT, then the usual
    Debian/Homebrew locations. Returns the resolved path or None."""
    import glob

    for cand in (explicit, os.environ.get(SOUNDFONT_ENV)):
        if cand:
            p = Path(cand).expanduser()
            if not p.is_file():
                raise ConfigError(f"soundfont not found: {p}")
            return p.resolve()
    for pattern in SOUNDFONT_CANDIDATES:
        for hit in sorted(glob.glob(os.path.expanduser(pattern))):
            p = Path(hit)
            if p.is_file() and p.suffix.lower() == ".sf2":
                return p.resolve()
    return None


@dataclass
class Toolset:
    """What this machine can render with. Missing entries carry a one-line fix in `missing`."""

    fluidsynth: str | None = None
    fluidsynth_version: str | None = None
    soundfont: Path | None = None
    presets: dict[tuple[int, int], str] | None = None  # None: soundfont unreadable or absent
    espeak: str | None = None
    espeak_version: str | None = None
    espeak_voices: dict[str, str] = field(default_factory=dict)  # variant -> gender "M"/"F"
    missing: list[str] = field(default_factory=list)

    @property
    def midi_ok(self) -> bool:
        return bool(self.fluidsynth and self.soundfont and self.presets)

    @property
    def speech_ok(self) -> bool:
        return bool(self.espeak)

    def summary(self) -> dict[str, Any]:
        return {
            "fluidsynth": {"available": bool(self.fluidsynth), "path": self.fluidsynth, "version": self.fluidsynth_version},
            "soundfont": {"available": bool(self.soundfont), "path": str(self.soundfont) if self.soundfont else None,
                          "bytes": self.soundfont.stat().st_size if self.soundfont else None,
                          "presets": len(self.presets) if self.presets else 0},
            "espeak-ng": {"available": bool(self.espeak), "path": self.espeak, "version": self.espeak_version,
                          "voice_variants": len(self.espeak_voices)},
            "missing": list(self.missing),
        }


def _parse_tools_override(available_tools: Collection[str] | None) -> set[str] | None:
    if available_tools is None:
        env = os.environ.get(TOOLS_ENV)
        if env is None:
            return None
        available_tools = [] if env.strip().lower() in ("", "none") else [t.strip() for t in env.split(",")]
    allowed = set(available_tools)
    unknown = allowed - set(TOOLS)
    if unknown:
        raise ConfigError(f"unknown tool(s) {sorted(unknown)} in available_tools/${TOOLS_ENV}; known: {', '.join(TOOLS)}")
    return allowed


def _version(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"(\d+\.\d+(?:\.\d+)?)", out.stdout + out.stderr)
    return m.group(1) if m else None


def _espeak_variants(exe: str) -> dict[str, str]:
    try:
        out = subprocess.run([exe, "--voices=variant"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    voices: dict[str, str] = {}
    for line in out.splitlines()[1:]:
        m = re.search(r"\s\S*/([MF])\s.*!v/(\S+)", line)
        if m:
            voices[m.group(2)] = m.group(1)
    return voices


def detect_tools(available_tools: Collection[str] | None = None, soundfont: str | Path | None = None) -> Toolset:
    """Find fluidsynth, a GM soundfont and espeak-ng.

    available_tools: restrict to these of TOOLS (tests simulate missing tools with it); None reads
    $FINELAP_CORPUS_TOOLS, and if that is unset uses whatever is installed.
    """
    allowed = _parse_tools_override(available_tools)
    ok = (lambda t: True) if allowed is None else (lambda t: t in allowed)
    ts = Toolset()
    if ok("fluidsynth") and (exe := shutil.which("fluidsynth")):
        ts.fluidsynth, ts.fluidsynth_version = exe, _version([exe, "--version"])
    else:
        ts.missing.append(f"fluidsynth not found (instruments, drums and sound effects skipped); fix: {APT_HINT['fluidsynth']}")
    if ok("soundfont") and (sf2 := find_soundfont(soundfont)):
        ts.soundfont = sf2
        try:
            ts.presets = read_sf2_presets(sf2)
        except (OSError, FinelapError) as e:
            ts.missing.append(f"soundfont {sf2} unreadable ({e}); fix: {APT_HINT['soundfont']}")
    else:
        ts.missing.append(f"no General MIDI soundfont (.sf2) found in /usr/share/sounds/sf2 or /usr/share/soundfonts "
                          f"(set ${SOUNDFONT_ENV} to use another); fix: {APT_HINT['soundfont']}")
    if ok("espeak-ng") and (exe := shutil.which("espeak-ng")):
        ts.espeak, ts.espeak_version = exe, _version([exe, "--version"])
        ts.espeak_voices = _espeak_variants(exe)
    else:
        ts.missing.append(f"espeak-ng not found (speech skipped); fix: {APT_HINT['espeak-ng']}")
    return ts


# ----------------------------------------------------------------------------- classes


@dataclass(frozen=True)
class SoundClass:
    """One class of the pool.

    slug: folder name; label: the natural phrase used as label and event label.
    source: "instrument" | "drum" | "sfx" | "speech" | "procedural".
    bank/program: 0-based GM bank and program (for drums: unused, kit chosen per clip).
    keys: MIDI key range (lo, hi) for instruments/sfx, or the drum keys for drums.
    styles: how clips are played (instrument: melody/chords/arpeggio; sfx: sustain/hits).
    preset_name: required substring of the soundfont preset name (variation banks only), so a
        soundfont lacking the preset cannot silently substitute another sound under this label.
    voices: espeak-ng voice variants; gender: "M"/"F" the variant must be listed with.
    """

    slug: str
    label: str
    source: str
    bank: int = 0
    program: int = 0
    keys: tuple[int, ...] = ()
    styles: tuple[str, ...] = ()
    legato: bool = False
    preset_name: str = ""
    voices: tuple[str, ...] = ()
    gender: str = ""

    def describe(self) -> str:
        if self.source in ("instrument", "sfx"):
            return f"GM bank {self.bank} program {self.program + 1} (1-based)"
        if self.source == "drum":
            return f"GM drum keys {', '.join(map(str, self.keys))} on channel 10"
        if self.source == "speech":
            return "espeak-ng voices " + ", ".join(self.voices)
        return "procedurally synthesised (numpy)"


def _inst(slug: str, label: str, program: int, lo: int, hi: int, styles: tuple[str, ...], legato: bool = False) -> SoundClass:
    return SoundClass(slug, label, "instrument", 0, program - 1, (lo, hi), styles, legato)


def _sfx(slug: str, label: str, program: int, lo: int, hi: int, styles: tuple[str, ...], bank: int = 0,
         preset_name: str = "") -> SoundClass:
    return SoundClass(slug, label, "sfx", bank, program - 1, (lo, hi), styles, preset_name=preset_name)


def _drum(slug: str, label: str, *keys: int) -> SoundClass:
    return SoundClass(slug, label, "drum", 128, 0, tuple(keys), ("hits",))


MEN = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "david", "paul", "john", "edward", "max", "norbert", "quincy")
WOMEN = ("f1", "f2", "f3", "f4", "f5", "linda", "belinda", "steph", "Andrea", "Annie", "aunty")

# Program numbers below are 1-based, as GM lists print them. Labels name what the preset sounds like.
_DEFAULT_CLASSES: tuple[SoundClass, ...] = (
    _inst("piano", "a piano playing", 1, 45, 84, ("melody", "chords", "arpeggio")),
    _inst("harpsichord", "a harpsichord playing", 7, 48, 84, ("melody", "arpeggio")),
    _inst("music_box", "a music box playing", 11, 67, 96, ("melody", "arpeggio")),
    _inst("xylophone", "a xylophone playing", 14, 60, 96, ("melody",)),
    _inst("tubular_bells", "bells chiming", 15, 60, 79, ("melody",)),
    _inst("church_organ", "a church organ playing", 20, 36, 76, ("chords", "melody"), legato=True),
    _inst("accordion", "an accordion playing", 22, 53, 81, ("melody", "chords"), legato=True),
    _inst("acoustic_guitar", "an acoustic guitar playing", 25, 40, 76, ("chords", "arpeggio", "melody")),
    _inst("electric_guitar", "an electric guitar playing", 31, 40, 72, ("melody", "chords")),
    _inst("violin", "a violin playing", 41, 55, 91, ("melody",), legato=True),
    _inst("cello", "a cello playing", 43, 36, 69, ("melody",), legato=True),
    _inst("harp", "a harp playing", 47, 36, 91, ("arpeggio", "melody")),
    _inst("choir", "a choir singing", 53, 48, 76, ("chords", "melody"), legato=True),
    _inst("trumpet", "a trumpet playing", 57, 55, 82, ("melody",), legato=True),
    _inst("trombone", "a trombone playing", 58, 40, 70, ("melody",), legato=True),
    _inst("saxophone", "a saxophone playing", 66, 49, 80, ("melody",), legato=True),
    _inst("clarinet", "a clarinet playing", 72, 50, 86, ("melody",), legato=True),
    _inst("flute", "a flute playing", 74, 60, 93, ("melody",), legato=True),
    _inst("whistling", "someone whistling", 79, 72, 96, ("melody",), legato=True),
    _inst("banjo", "a banjo playing", 106, 48, 79, ("melody", "arpeggio", "chords")),
    _inst("bagpipes", "bagpipes playing", 110, 55, 77, ("melody",), legato=True),
    _inst("steel_drums", "steel drums playing", 115, 52, 84, ("melody", "arpeggio")),
    _drum("kick_drum", "a kick drum beating", 35, 36),
    _drum("snare_drum", "a snare drum being hit", 38, 40),
    _drum("hi_hat", "a hi-hat ticking", 42, 44, 46),
    _drum("crash_cymbal", "a crash cymbal crashing", 49, 57),
    _drum("tom_drum", "a tom drum being hit", 41, 43, 45, 47, 48, 50),
    _drum("hand_clap", "hands clapping", 39),
    _drum("cowbell", "a cowbell clanking", 56),
    _drum("tambourine", "a tambourine jingling", 54),
    _drum("bongos", "bongo drums playing", 60, 61),
    _drum("wood_block", "a wood block knocking", 76, 77),
    _drum("triangle", "a triangle ringing", 80, 81),
    _drum("maracas", "maracas shaking", 70),
    # GM sound effects, programs 121-128
    _sfx("guitar_fret_noise", "guitar fret noise", 121, 40, 76, ("hits",)),
    _sfx("breathing", "breathing noise", 122, 55, 72, ("hits", "sustain")),
    _sfx("seashore", "waves on a seashore", 123, 48, 76, ("sustain",)),
    _sfx("bird", "a bird tweeting", 124, 60, 84, ("hits", "sustain")),
    _sfx("telephone", "a telephone ringing", 125, 62, 72, ("sustain",)),
    _sfx("helicopter", "a helicopter flying", 126, 48, 72, ("sustain",)),
    _sfx("applause", "a crowd applauding", 127, 55, 72, ("sustain",)),
    _sfx("gunshot", "a gun firing", 128, 48, 72, ("hits",)),
    # Variation presets: only where the soundfont holds them (GS banks; FluidR3 bank 8)
    _sfx("church_bell", "a church bell ringing", 15, 55, 72, ("hits",), bank=8, preset_name="bell"),
    _sfx("castanets", "castanets clicking", 116, 60, 72, ("hits",), bank=8, preset_name="castanet"),
    _sfx("rain", "rain falling", 123, 55, 72, ("sustain",), bank=1, preset_name="rain"),
    _sfx("thunder", "thunder rumbling", 123, 48, 64, ("sustain",), bank=2, preset_name="thunder"),
    _sfx("wind", "wind blowing", 123, 48, 72, ("sustain",), bank=3, preset_name="wind"),
    _sfx("stream", "a stream flowing", 123, 55, 72, ("sustain",), bank=4, preset_name="stream"),
    _sfx("dog", "a dog barking", 124, 55, 67, ("hits",), bank=1, preset_name="dog"),
    _sfx("horse", "a horse galloping", 124, 55, 67, ("sustain",), bank=2, preset_name="horse"),
    _sfx("door_creak", "a door creaking", 125, 55, 67, ("hits",), bank=2, preset_name="creak"),
    _sfx("car_engine", "a car engine running", 126, 48, 67, ("sustain",), bank=1, preset_name="engine"),
    _sfx("siren", "a siren wailing", 126, 55, 67, ("sustain",), bank=5, preset_name="siren"),
    _sfx("train", "a train passing", 126, 55, 67, ("sustain",), bank=6, preset_name="train"),
    _sfx("laughing", "people laughing", 127, 55, 67, ("sustain",), bank=1, preset_name="laugh"),
    _sfx("screaming", "a person screaming", 127, 55, 67, ("hits",), bank=2, preset_name="scream"),
    _sfx("heartbeat", "a heart beating", 127, 55, 67, ("sustain",), bank=4, preset_name="heart"),
    _sfx("footsteps", "footsteps walking", 127, 55, 67, ("sustain",), bank=5, preset_name="foot"),
    _sfx("machine_gun", "a machine gun firing", 128, 55, 67, ("sustain",), bank=1, preset_name="machine"),
    _sfx("explosion", "an explosion", 128, 48, 60, ("hits",), bank=3, preset_name="explosion"),
    SoundClass("man_speaking", "a man speaking", "speech", voices=MEN, gender="M"),
    SoundClass("woman_speaking", "a woman speaking", "speech", voices=WOMEN, gender="F"),
    SoundClass("whispering", "a person whispering", "speech", voices=("whisper", "whisperf")),
)

_PROCEDURAL: tuple[SoundClass, ...] = tuple(
    SoundClass(slug, label, "procedural")
    for slug, label in (
        ("high_beep", "a high beep"),
        ("low_hum", "a low hum"),
        ("rising_chirp", "a rising chirp"),
        ("falling_chirp", "a falling chirp"),
        ("white_noise", "a burst of white noise"),
        ("clicks", "a ticking clicking sound"),
        ("two_tone_alarm", "a two-tone alarm beeping"),
        ("buzz", "an electric buzzing"),
    )
)


def default_classes() -> list[SoundClass]:
    """Every class the pool may contain when all tools are present (variation-bank classes are
    dropped at build time when the soundfont lacks them)."""
    return list(_DEFAULT_CLASSES)


def procedural_classes() -> list[SoundClass]:
    """The fallback classes synthesised with numpy when no real-sound source is available."""
    return list(_PROCEDURAL)


SENTENCES = (
    "The weather is mild today.",
    "Please close the door behind you.",
    "The train leaves at seven.",
    "I will call you back later.",
    "We need more paper for the printer.",
    "The library opens at nine.",
    "Turn left at the next corner.",
    "The soup is still warm.",
    "She bought apples at the market.",
    "The meeting has been moved to Friday.",
    "Let me know when you arrive.",
    "The garden looks lovely in spring.",
    "He forgot his umbrella again.",
    "Our flight was on time.",
    "The keys are on the table.",
    "Could you pass the salt, please?",
    "The bus is running a little late.",
    "I think it might rain tonight.",
    "The children are playing outside.",
    "This road leads to the river.",
    "Dinner will be ready soon.",
    "The shop is closed on Sundays.",
    "Remember to water the plants.",
    "The music was very quiet.",
    "We walked along the beach.",
    "Thank you for your help.",
    "The package arrived this morning.",
    "Write your name at the top.",
    "The lamp needs a new bulb.",
    "It is a short walk from here.",
)

# ----------------------------------------------------------------------------- clip plans (seeded)

_SCALES = {
    "major": (0, 2, 4, 5, 7, 9, 11),
    "minor": (0, 2, 3, 5, 7, 8, 10),
    "pentatonic": (0, 2, 4, 7, 9),
    "dorian": (0, 2, 3, 5, 7, 9, 10),
    "mixolydian": (0, 2, 4, 5, 7, 9, 10),
}
_NOTE_NAMES = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")


def clip_rng(seed: int, slug: str, index: int) -> np.random.Generator:
    """Per-clip RNG: independent of worker count and of which other classes are built."""
    h = hashlib.sha256(f"finelap-corpus:{seed}:{slug}:{index}".encode()).digest()
    return np.random.default_rng(int.from_bytes(h[:8], "little"))


def _scale_keys(tonic: int, scale: Sequence[int], lo: int, hi: int) -> list[int]:
    return [k for k in range(lo, hi + 1) if (k - tonic) % 12 in scale]


def _plan_instrument(c: SoundClass, rng: np.random.Generator, content_s: float) -> tuple[list[MidiNote], str]:
    lo, hi = c.keys
    style = str(rng.choice(c.styles))
    scale_name = str(rng.choice(sorted(_SCALES)))
    tonic = int(rng.integers(lo, max(lo + 1, hi - 11)))
    keys = _scale_keys(tonic, _SCALES[scale_name], lo, hi)
    bpm = float(rng.uniform(70, 150))
    beat = 60.0 / bpm
    notes: list[MidiNote] = []
    t = 0.0
    if style == "melody":
        idx = min(range(len(keys)), key=lambda i: abs(keys[i] - tonic))
        lengths = (1.0, 1.5, 2.0, 3.0) if c.legato else (0.5, 0.5, 1.0, 1.0, 1.5, 2.0)
        while t < content_s - 0.05:
            length = beat * float(rng.choice(lengths))
            idx = int(np.clip(idx + int(rng.choice((-2, -1, -1, 0, 1, 1, 2, 3, -3))), 0, len(keys) - 1))
            gate = 0.97 if c.legato else float(rng.uniform(0.5, 0.95))
            dur = min(length * gate, content_s - t)
            vel = int(np.clip(rng.normal(92, 12), 50, 122))
            notes.append(MidiNote(t, max(dur, 0.05), keys[idx], vel))
            t += length
    elif style == "chords":
        n_chords = int(rng.integers(1, 4))
        chord_len = content_s / n_chords
        strum = 0.0 if c.legato else float(rng.uniform(0.0, 0.04))
        n = len(_SCALES[scale_name])
        for j in range(n_chords):
            root = int(rng.integers(0, max(1, len(keys) - 5)))
            # triad from scale steps; pentatonic gets stacked 2-steps too (consonant there)
            chord = [keys[min(root + s, len(keys) - 1)] for s in ((0, 2, 4) if n > 5 else (0, 2, 3))]
            vel = int(np.clip(rng.normal(88, 10), 50, 120))
            for k, key in enumerate(sorted(set(chord))):
                start = j * chord_len + k * strum
                notes.append(MidiNote(start, max(chord_len * 0.95 - k * strum, 0.05), key, vel))
    else:  # arpeggio
        step = beat / 2
        root = int(rng.integers(0, max(1, len(keys) - 7)))
        pattern = [root, root + 2, root + 4, root + 7, root + 4, root + 2]
        i = 0
        while t < content_s - 0.05:
            key = keys[min(pattern[i % len(pattern)], len(keys) - 1)]
            vel = int(np.clip(rng.normal(85, 10), 45, 120))
            notes.append(MidiNote(t, max(min(step * 1.8, content_s - t), 0.05), key, vel))
            t += step
            i += 1
    detail = f"{style}, {_NOTE_NAMES[tonic % 12]} {scale_name}, {bpm:.0f} bpm, {len(notes)} notes"
    return notes, detail


def _plan_drum(c: SoundClass, rng: np.random.Generator, content_s: float, kits: Sequence[int]) -> tuple[list[MidiNote], int, str]:
    kit = int(rng.choice(kits))
    n_hits = int(rng.choice((1, 2, 2, 3, 3, 4, 5, 6)))
    interval = float(rng.uniform(0.15, 0.6))
    n_hits = max(1, min(n_hits, int(content_s / interval) + 1))
    notes = []
    for i in range(n_hits):
        t = i * interval + float(rng.uniform(0.0, 0.02))  # slight human timing
        key = int(rng.choice(c.keys))
        notes.append(MidiNote(t, 0.1, key, int(rng.integers(60, 128)), DRUM_CHANNEL))
    return notes, kit, f"kit {kit}, {n_hits} hits every {interval:.2f} s"


def _plan_sfx(c: SoundClass, rng: np.random.Generator, content_s: float) -> tuple[list[MidiNote], str]:
    lo, hi = c.keys
    style = str(rng.choice(c.styles))
    key = int(rng.integers(lo, hi + 1))
    vel = int(rng.integers(80, 128))
    if style == "sustain":
        notes = [MidiNote(0.0, content_s, key, vel)]
        if rng.random() < 0.3:  # a second, overlapping layer at another pitch thickens it
            notes.append(MidiNote(float(rng.uniform(0.0, content_s / 2)), content_s / 2, int(rng.integers(lo, hi + 1)), vel))
    else:
        n = int(rng.integers(1, 5))
        gap = content_s / n
        notes = []
        for i in range(n):
            k = int(np.clip(key + int(rng.integers(-2, 3)), 0, 127))
            notes.append(MidiNote(i * gap, float(rng.uniform(0.15, max(0.2, gap * 0.8))), k, int(rng.integers(70, 128))))
    return notes, f"{style}, key {key}, {len(notes)} notes"


# ----------------------------------------------------------------------------- renderers


def render_midi(midi: bytes, soundfont: str | Path, fluidsynth: str = "fluidsynth", sample_rate: int = 16000,
                timeout: float = 60.0, gain: float = 0.8) -> np.ndarray:
    """Render SMF bytes offline with fluidsynth; returns mono float32 (N,) at `sample_rate`.

    -F fast-renders to a file (no audio or MIDI driver is opened), -f /dev/null keeps a user's
    ~/.fluidsynth from changing the sound, float output avoids clipping and 16-bit dither, and
    dynamic sample loading reads only the samples the file uses (0.1 s instead of 0.5 s per call).
    """
    from ..audio import load_audio

    with tempfile.TemporaryDirectory(prefix="finelap-fs-") as tmp:
        mid, wav = Path(tmp) / "in.mid", Path(tmp) / "out.wav"
        mid.write_bytes(midi)
        cmd = [fluidsynth, "-n", "-i", "-q", "-f", os.devnull, "-o", "synth.dynamic-sample-loading=1",
               "-R", "1", "-C", "1", "-g", str(gain), "-r", str(sample_rate), "-T", "wav", "-O", "float",
               "-F", str(wav), str(soundfont), str(mid)]
        _run(cmd, timeout)
        if not wav.exists():
            raise RuntimeError("fluidsynth wrote no audio")
        return load_audio(wav, sample_rate)


def render_speech(text: str, voice: str, espeak: str = "espeak-ng", speed: int = 160, pitch: int = 50,
                  sample_rate: int = 16000, timeout: float = 30.0) -> np.ndarray:
    """Speak `text` with espeak-ng (`voice` like "en+f3"); mono float32 (N,) resampled to `sample_rate`."""
    from ..audio import load_audio

    with tempfile.TemporaryDirectory(prefix="finelap-es-") as tmp:
        wav = Path(tmp) / "out.wav"
        _run([espeak, "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(wav), "--", text], timeout)
        return load_audio(wav, sample_rate)


def _run(cmd: list[str], timeout: float) -> None:
    try:
        proc = subprocess.run(cmd, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{Path(cmd[0]).name} timed out after {timeout:.0f} s") from None
    if proc.returncode != 0:
        err = (proc.stderr or proc.stdout).decode("utf-8", "replace").strip().splitlines()
        raise RuntimeError(f"{Path(cmd[0]).name} exited {proc.returncode}: {err[-1] if err else 'no message'}")


def _procedural(slug: str, rng: np.random.Generator, content_s: float, sr: int) -> tuple[np.ndarray, str]:
    n = int(content_s * sr)
    t = np.arange(n) / sr

    def env(length: int, attack: float = 0.01, release: float = 0.05) -> np.ndarray:
        e = np.ones(length)
        a, r = max(1, int(attack * sr)), max(1, int(release * sr))
        e[:a] = np.linspace(0, 1, a)[: length]
        e[-r:] *= np.linspace(1, 0, r)[-length:]
        return e

    x = np.zeros(n)
    if slug == "high_beep":
        f = rng.uniform(1500, 4000)
        k = int(rng.integers(1, 5))
        blen = int(rng.uniform(0.08, 0.3) * sr)
        for i in range(k):
            s = int(i * n / k)
            m = min(blen, n - s)
            x[s : s + m] += np.sin(2 * np.pi * f * t[:m]) * env(m, 0.005, 0.01)
        detail = f"{k} beeps at {f:.0f} Hz"
    elif slug == "low_hum":
        f = rng.uniform(50, 120)
        x = sum(np.sin(2 * np.pi * f * h * t) / h for h in (1, 2, 3, 4)) * (1 + 0.2 * np.sin(2 * np.pi * rng.uniform(0.5, 3) * t))
        x *= env(n, 0.1, 0.2)
        detail = f"hum at {f:.0f} Hz"
    elif slug in ("rising_chirp", "falling_chirp"):
        f0, f1 = rng.uniform(200, 500), rng.uniform(2000, 5000)
        if slug == "falling_chirp":
            f0, f1 = f1, f0
        phase = 2 * np.pi * f0 * content_s / np.log(f1 / f0) * (np.power(f1 / f0, t / content_s) - 1)
        x = np.sin(phase) * env(n, 0.02, 0.05)
        detail = f"sweep {f0:.0f} -> {f1:.0f} Hz"
    elif slug == "white_noise":
        x = rng.standard_normal(n) * 0.3 * env(n, 0.01, 0.1)
        detail = "white noise"
    elif slug == "clicks":
        rate = rng.uniform(2, 10)
        for s in np.arange(0, content_s, 1 / rate):
            i = int(s * sr)
            m = min(int(0.004 * sr), n - i)
            x[i : i + m] += rng.standard_normal(m) * np.linspace(1, 0, m)
        detail = f"clicks at {rate:.1f} Hz"
    elif slug == "two_tone_alarm":
        fa, fb = rng.uniform(600, 900), rng.uniform(1000, 1500)
        period = rng.uniform(0.25, 0.5)
        f = np.where((t // period) % 2 == 0, fa, fb)
        x = np.sin(2 * np.pi * np.cumsum(f) / sr) * env(n)
        detail = f"{fa:.0f}/{fb:.0f} Hz every {period:.2f} s"
    elif slug == "buzz":
        f = rng.uniform(90, 300)
        x = (2 * ((f * t) % 1.0) - 1) * 0.5 * env(n, 0.02, 0.05)  # sawtooth
        detail = f"sawtooth at {f:.0f} Hz"
    else:
        raise ValueError(f"unknown procedural class {slug!r}")
    return x.astype(np.float32), detail


# ----------------------------------------------------------------------------- post-processing


def energy_bounds(x: np.ndarray, sr: int, rel_db: float = -40.0, floor_db: float = -80.0,
                  frame_s: float = 0.01) -> tuple[int, int] | None:
    """Sample span [start, end) of the audible part of `x` (N,): 10 ms frames whose RMS is within
    `rel_db` of the loudest frame and above `floor_db` dBFS. None when nothing passes (silence)."""
    hop = max(1, int(frame_s * sr))
    n_frames = int(np.ceil(len(x) / hop))
    if n_frames == 0:
        return None
    pad = np.zeros(n_frames * hop, dtype=np.float64)
    pad[: len(x)] = x
    rms = np.sqrt(np.mean(pad.reshape(n_frames, hop) ** 2, axis=1))
    db = 20 * np.log10(np.maximum(rms, 1e-12))
    thr = max(float(db.max()) + rel_db, floor_db)
    on = np.nonzero(db >= thr)[0]
    if len(on) == 0 or db.max() < floor_db:
        return None
    return int(on[0] * hop), int(min(len(x), (on[-1] + 1) * hop))


PEAK = 10 ** (-3 / 20)  # -3 dBFS
MARKER = ".finelap-corpus"


def _finish(x: np.ndarray, sr: int, rng: np.random.Generator, min_s: float, max_s: float) -> tuple[np.ndarray, float, float]:
    """Trim to the audible part, add seeded leading/trailing silence, cap at max_s with a fade,
    pad to min_s, normalise the peak. Returns (audio (N,), onset_s, offset_s) of the event."""
    if not np.isfinite(x).all():
        raise RuntimeError("rendered audio contains NaN/Inf")
    b = energy_bounds(x, sr)
    if b is None:
        raise RuntimeError("rendered audio is silent")
    y = x[b[0] : b[1]].astype(np.float64)
    lead = int(rng.uniform(0.05, 0.3) * sr)
    tail = int(rng.uniform(0.05, 0.3) * sr)
    room = int(max_s * sr) - lead - tail
    if len(y) > room:  # too long (e.g. a long reverb tail): cut with a 50 ms fade
        y = y[:room]
        f = min(len(y), int(0.05 * sr))
        y[-f:] *= np.linspace(1.0, 0.0, f)
        b2 = energy_bounds(y, sr)
        y = y[: b2[1]] if b2 else y
    peak = float(np.abs(y).max())
    y = y * (PEAK / peak)
    out = np.concatenate([np.zeros(lead), y, np.zeros(tail)])
    if len(out) < int(round(min_s * sr)):
        out = np.concatenate([out, np.zeros(int(round(min_s * sr)) - len(out))])
    return out.astype(np.float32), lead / sr, (lead + len(y)) / sr


# ----------------------------------------------------------------------------- build


@dataclass
class CorpusResult:
    """What `build_corpus` produced (or reused)."""

    out_dir: Path
    manifest: Path
    clips: list[Clip]
    classes: list[str]  # label phrases, in classes.txt order
    reused: bool
    missing: list[str]
    skipped_classes: list[dict[str, str]]
    skipped_clips: list[dict[str, str]]
    synthetic: bool
    config_hash: str


@dataclass(frozen=True)
class _Job:
    cls: SoundClass
    index: int

    @property
    def id(self) -> str:
        return f"{self.cls.slug}-{self.index:03d}"

    @property
    def rel(self) -> str:
        return f"audio/{self.cls.slug}/{self.index:03d}.flac"


def _select(classes: Sequence[SoundClass], only: Collection[str] | None) -> list[SoundClass]:
    if not only:
        return list(classes)
    wanted = {w.strip().lower() for w in only if w.strip()}
    known = {c.slug.lower() for c in classes} | {c.label.lower() for c in classes}
    unknown = sorted(wanted - known)
    if unknown:
        raise ConfigError(f"unknown corpus class(es) {unknown}; run `finelap corpus --list` to see them")
    return [c for c in classes if c.slug.lower() in wanted or c.label.lower() in wanted]


def _availability(c: SoundClass, ts: Toolset) -> str | None:
    """None if `c` can be rendered with `ts`, else the reason it is skipped."""
    if c.source in ("instrument", "drum", "sfx"):
        if not ts.midi_ok:
            return "needs fluidsynth and a GM soundfont"
        assert ts.presets is not None
        preset = ts.presets.get((c.bank, c.program if c.source != "drum" else 0))
        if preset is None:
            where = "drum kit (bank 128)" if c.source == "drum" else f"bank {c.bank} program {c.program + 1}"
            return f"soundfont {ts.soundfont.name if ts.soundfont else ''} has no preset at {where}"
        if c.preset_name and c.preset_name.lower() not in preset.lower():
            return (f"soundfont preset at bank {c.bank} program {c.program + 1} is {preset!r}, not {c.preset_name!r}; "
                    "fluidsynth would play another sound under this label")
        return None
    if c.source == "speech":
        if not ts.speech_ok:
            return "needs espeak-ng"
        if ts.espeak_voices and not _voices(c, ts):
            return "none of its espeak-ng voice variants is installed"
        return None
    return None


def _voices(c: SoundClass, ts: Toolset) -> list[str]:
    if not ts.espeak_voices:  # listing failed: trust the built-in variant names
        return list(c.voices)
    return [v for v in c.voices if v in ts.espeak_voices and (not c.gender or ts.espeak_voices[v] == c.gender)]


def _render_job(job: _Job, ts: Toolset, seed: int, sr: int, min_s: float, max_s: float,
                timeout: float) -> tuple[np.ndarray, float, float, str]:
    c = job.cls
    rng = clip_rng(seed, c.slug, job.index)
    content_s = float(rng.uniform(min_s * 0.6, max_s * 0.75))
    if c.source in ("instrument", "drum", "sfx"):
        assert ts.fluidsynth and ts.soundfont and ts.presets is not None
        if c.source == "drum":
            kits = [k for k in (0, 8, 16, 32) if (128, k) in ts.presets] or [0]
            notes, kit, detail = _plan_drum(c, rng, content_s, kits)
            programs = {DRUM_CHANNEL: (128, kit)}
        elif c.source == "instrument":
            notes, detail = _plan_instrument(c, rng, content_s)
            programs = {0: (c.bank, c.program)}
        else:
            notes, detail = _plan_sfx(c, rng, content_s)
            programs = {0: (c.bank, c.program)}
        x = render_midi(notes_to_smf(notes, programs), ts.soundfont, ts.fluidsynth, sr, timeout)
        detail = f"{c.describe()}: {detail}"
    elif c.source == "speech":
        assert ts.espeak
        voice = "en+" + str(rng.choice(_voices(c, ts)))
        text = str(rng.choice(SENTENCES))
        # espeak's -p shifts the variant's own pitch; keep men low and women high so the label holds
        lo, hi = {"M": (20, 56), "F": (45, 86)}.get(c.gender, (30, 71))
        speed, pitch = int(rng.integers(130, 185)), int(rng.integers(lo, hi))
        x = render_speech(text, voice, ts.espeak, speed, pitch, sr, timeout)
        detail = f"espeak-ng {voice}, {speed} wpm, pitch {pitch}: {text!r}"
    else:
        x, detail = _procedural(c.slug, rng, content_s, sr)
    y, on, off = _finish(x, sr, rng, min_s, max_s)
    return y, on, off, detail


def _write_flac(path: Path, y: np.ndarray, sr: int) -> None:
    import soundfile as sf

    with atomic_path(path) as tmp:
        sf.write(str(tmp), y, sr, format="FLAC", subtype="PCM_16")


def _config(per_class: int, seed: int, sr: int, min_s: float, max_s: float, classes: Sequence[SoundClass],
            ts: Toolset, synthetic: str) -> dict[str, Any]:
    sf2 = ts.soundfont
    return {
        "corpus_version": CORPUS_VERSION,
        "per_class": per_class,
        "seed": seed,
        "sample_rate": sr,
        "min_duration": min_s,
        "max_duration": max_s,
        "synthetic": synthetic,
        "classes": [c.slug for c in classes],
        "fluidsynth": ts.fluidsynth_version if ts.fluidsynth else None,
        "soundfont": [str(sf2), sf2.stat().st_size] if sf2 else None,
        "espeak-ng": ts.espeak_version if ts.espeak else None,
    }


def _config_hash(cfg: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]


def _try_reuse(out: Path, cfg_hash: str) -> CorpusResult | None:
    manifest, sources = out / "manifest.jsonl", out / "sources.json"
    if not (manifest.is_file() and sources.is_file()):
        return None
    try:
        info = json.loads(sources.read_text(encoding="utf-8"))
        if info.get("config_hash") != cfg_hash:
            return None
        from ..data.manifests import read_manifest

        clips = read_manifest(manifest)  # validates the lines and that every audio file exists
    except (OSError, ValueError, FinelapError):
        return None
    if len(clips) != info.get("n_clips"):
        return None
    return CorpusResult(out, manifest, clips, list(info.get("class_labels", [])), True, list(info.get("missing", [])),
                        list(info.get("skipped_classes", [])), list(info.get("skipped_clips", [])),
                        bool(info.get("synthetic_fallback")), cfg_hash)


def build_corpus(
    out: str | Path,
    per_class: int = 8,
    seed: int = 0,
    workers: int = 2,
    classes: Collection[str] | None = None,
    available_tools: Collection[str] | None = None,
    soundfont: str | Path | None = None,
    synthetic: str = "auto",
    sample_rate: int = 16000,
    min_duration: float = 1.0,
    max_duration: float = 4.0,
    force: bool = False,
    timeout: float = 60.0,
    show_progress: bool | None = None,
    say: Callable[[str], None] = log,
) -> CorpusResult:
    """Build (or reuse) the default pool under `out`.

    per_class: clips per class; seed: makes the pool reproducible; workers: parallel renders
    (threads driving fluidsynth/espeak-ng subprocesses; output does not depend on it).
    classes: slugs or label phrases to build (None: all that the tools can render).
    available_tools: subset of TOOLS to treat as installed (None: $FINELAP_CORPUS_TOOLS or detect).
    synthetic: "auto" (procedural sounds only if no real source gives any clip), "always", "never".
    force: rebuild even if `out` holds a pool with the same configuration.
    Missing tools are reported through `say`, one line each with the apt-get fix; they are not errors
    unless nothing at all can be built.
    """
    if per_class < 1:
        raise ConfigError(f"per_class must be >= 1, got {per_class}")
    if not 0 < min_duration <= max_duration:
        raise ConfigError(f"need 0 < min_duration <= max_duration, got {min_duration}, {max_duration}")
    if max_duration < 0.7:
        raise ConfigError(f"max_duration must be >= 0.7 s (room for the event plus silence), got {max_duration}")
    if synthetic not in ("auto", "always", "never"):
        raise ConfigError(f"synthetic must be auto, always or never, got {synthetic!r}")
    if workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    out = Path(out)
    ts = detect_tools(available_tools, soundfont)
    for line in ts.missing:
        say(f"corpus: {line}")

    real_selected = _select(default_classes(), None)
    procedural = procedural_classes()
    if classes:
        chosen = _select(real_selected + procedural, classes)
        real_selected = [c for c in chosen if c.source != "procedural"]
        explicit_proc = [c for c in chosen if c.source == "procedural"]
    else:
        explicit_proc = []
    skipped_classes: list[dict[str, str]] = []
    real: list[SoundClass] = []
    for c in real_selected:
        why = _availability(c, ts)
        if why is None:
            real.append(c)
        else:
            skipped_classes.append({"class": c.slug, "label": c.label, "reason": why})
    use_proc = list(explicit_proc)
    if synthetic == "always" and not classes:
        use_proc = procedural
    fallback = False
    if synthetic == "auto" and not real and not use_proc and not classes:
        fallback = True
        use_proc = procedural
    if not real and not use_proc:
        raise FinelapError("no sound source is available for the requested classes: " + "; ".join(ts.missing or
                           [s["reason"] for s in skipped_classes]))
    if skipped_classes:
        say(f"corpus: {len(skipped_classes)} class(es) skipped (reasons in sources.json): "
            + ", ".join(s["class"] for s in skipped_classes[:12]) + (", ..." if len(skipped_classes) > 12 else ""))
    selected = real + use_proc
    cfg = _config(per_class, seed, sample_rate, min_duration, max_duration, selected, ts, synthetic)
    cfg_hash = _config_hash(cfg)

    if fallback:
        say("corpus: " + "!" * 70)
        say("corpus: WARNING: no real-sound source (fluidsynth + GM soundfont, espeak-ng) is available.")
        say("corpus: Falling back to PROCEDURALLY SYNTHESISED tones, chirps and noise bursts.")
        say("corpus: For real sounds: sudo apt-get install -y fluidsynth fluid-soundfont-gm espeak-ng")
        say("corpus: " + "!" * 70)
    if not force:
        reused = _try_reuse(out, cfg_hash)
        if reused is not None:
            say(f"corpus: reusing the pool in {out} ({len(reused.clips)} clips, {len(reused.classes)} classes, "
                f"config {cfg_hash}); pass --force to rebuild")
            return reused

    _prepare_out(out)
    jobs = [_Job(c, i) for c in selected for i in range(per_class)]
    results: dict[int, tuple[float, float, float, str] | str] = {}
    lock = threading.Lock()

    def work(k: int) -> None:
        try:
            y, on, off, detail = _render_job(jobs[k], ts, seed, sample_rate, min_duration, max_duration, timeout)
            _write_flac(out / jobs[k].rel, y, sample_rate)
            res: tuple[float, float, float, str] | str = (len(y) / sample_rate, on, off, detail)
        except (RuntimeError, OSError, AudioError, ValueError) as e:  # one bad render is skipped, not fatal
            res = f"{type(e).__name__}: {e}"
        with lock:
            results[k] = res

    say(f"corpus: rendering {len(jobs)} clips ({len(selected)} classes x {per_class}) into {out} with {workers} worker(s)")
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(work, k) for k in range(len(jobs))]
        disable = None if show_progress is None else not show_progress
        for fut in progress(as_completed(futures), total=len(futures), desc="corpus", disable=disable):
            fut.result()

    clips: list[Clip] = []
    skipped_clips: list[dict[str, str]] = []
    counts: dict[str, int] = {c.slug: 0 for c in selected}
    for k, job in enumerate(jobs):
        r = results[k]
        if isinstance(r, str):
            skipped_clips.append({"id": job.id, "reason": r})
            continue
        duration, on, off, detail = r
        label = job.cls.label
        src = {"instrument": "fluidsynth", "drum": "fluidsynth", "sfx": "fluidsynth", "speech": "espeak-ng"}.get(
            job.cls.source, "procedural")
        # absolute here (write_manifest stores it relative to the manifest's folder)
        clips.append(Clip(audio=str((out / job.rel).resolve()), labels=[label], events=[Event(label, on, off)],
                          duration=round(duration, 6), id=job.id,
                          meta={"source": src, "src_file": job.id, "detail": detail}))
        counts[job.cls.slug] += 1
    for s in skipped_clips:
        say(f"corpus: skipped {s['id']}: {s['reason']}")
    built = [c for c in selected if counts[c.slug] > 0]
    if not clips:
        raise FinelapError(f"no clip could be rendered into {out}; first failure: {skipped_clips[0]['reason']}")

    write_text_atomic(out / "classes.txt", "".join(c.label + "\n" for c in built))
    sources = {
        "config_hash": cfg_hash,
        "config": cfg,
        "tools": ts.summary(),
        "missing": ts.missing,
        "synthetic_fallback": fallback,
        "n_clips": len(clips),
        "class_labels": [c.label for c in built],
        "classes": {c.slug: {"label": c.label, "source": c.source, "detail": c.describe(), "clips": counts[c.slug]}
                    for c in selected},
        "skipped_classes": skipped_classes,
        "skipped_clips": skipped_clips,
    }
    write_json_atomic(out / "sources.json", sources)
    from ..data.manifests import write_manifest

    # written last: its presence (with a matching hash) is what marks the pool complete
    write_manifest(out / "manifest.jsonl", clips)
    return CorpusResult(out, out / "manifest.jsonl", clips, [c.label for c in built], False, ts.missing,
                        skipped_classes, skipped_clips, fallback, cfg_hash)


def _prepare_out(out: Path) -> None:
    """Clear a previous pool (only one we wrote, marked by MARKER) so no stale clip survives."""
    audio = out / "audio"
    if audio.exists():
        if not (audio / MARKER).exists() and any(audio.iterdir()):
            raise ConfigError(f"{audio} exists and was not written by finelap corpus; choose another --out")
        shutil.rmtree(audio)
    for name in ("manifest.jsonl", "sources.json", "classes.txt"):
        (out / name).unlink(missing_ok=True)
    audio.mkdir(parents=True, exist_ok=True)
    (audio / MARKER).write_text("written by `finelap corpus`; safe to delete with the pool\n", encoding="utf-8")
