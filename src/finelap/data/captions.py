"""Phrase bank and caption templates for synthesised soundscapes.

Event labels come in many shapes: ESC-50 class names (``chirping_birds``), the demo corpus' natural
phrases (``a violin playing``) or whatever a user's pool uses. The `PhraseBank` maps each label to a
few natural variants ("dog" -> "a dog barking", "a barking dog", "a dog barks") plus a *clause*
(a short sentence, "a dog barks") used to build captions that mention order, count and rough timing
("A dog barks twice, then a car horn honks."). It has hand-written entries for the ESC-50 classes and
the demo corpus' sounds, and a rule-based fallback for any other label. The bank used for a dataset
is saved next to it as ``phrase_bank.json`` (see `PhraseBank.to_json`), so training can draw label
variants (`finelap.data.phrases.PhraseClusters.build(labels, variants=bank.as_mapping(labels))`).

`caption_soundscape` writes several phrasings per soundscape from templates. An external captioner
can be plugged in with `load_captioner("module:function")`; it is off by default and nothing is
downloaded.
"""
from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from ..errors import ConfigError, DataFormatError
from .types import Event

__all__ = [
    "PhraseEntry",
    "PhraseBank",
    "caption_soundscape",
    "load_captioner",
    "Captioner",
    "count_adverb",
    "number_word",
]

Captioner = Callable[[Sequence[Event], float], list]


def _norm(label: str) -> str:
    """Lookup key: lower case, underscores/hyphens between words as spaces, single spaces."""
    return " ".join(str(label).strip().lower().replace("_", " ").split())


@dataclass(frozen=True)
class PhraseEntry:
    """Natural phrasings of one label.

    variants: noun-phrase forms, the first is the canonical one ("a dog barking", "a barking dog").
    clause: a short sentence form that can take an adverb of count ("a dog barks" + " twice").
    """

    variants: tuple[str, ...]
    clause: str

    def __post_init__(self) -> None:
        if not self.variants or not all(isinstance(v, str) and v.strip() for v in self.variants):
            raise ValueError(f"a phrase entry needs at least one non-empty variant, got {self.variants!r}")
        # rules can produce the same phrase twice ("bells chiming"); keep the first of each
        object.__setattr__(self, "variants", tuple(dict.fromkeys(v.strip() for v in self.variants)))
        if not self.clause.strip():
            raise ValueError("a phrase entry needs a non-empty clause")


# ----------------------------------------------------------------------------- built-in entries
# (variants..., clause). The first variant is the canonical phrase: "-ing" form, with an article.
_ESC50: dict[str, tuple[list[str], str]] = {
    "dog": (["a dog barking", "a barking dog", "dog barking", "a dog barks"], "a dog barks"),
    "rooster": (["a rooster crowing", "a crowing rooster", "a cock crowing", "a rooster crows"], "a rooster crows"),
    "pig": (["a pig oinking", "a grunting pig", "a pig grunting", "pig oinks"], "a pig oinks"),
    "cow": (["a cow mooing", "a mooing cow", "cattle mooing", "a cow moos"], "a cow moos"),
    "frog": (["a frog croaking", "croaking frogs", "a croaking frog", "frogs croak"], "a frog croaks"),
    "cat": (["a cat meowing", "a meowing cat", "a cat meows", "a kitten mewing"], "a cat meows"),
    "hen": (["a hen clucking", "clucking chickens", "a chicken clucking", "a hen clucks"], "a hen clucks"),
    "insects": (["insects buzzing", "buzzing insects", "the buzz of insects", "a fly buzzing"], "insects buzz"),
    "sheep": (["a sheep bleating", "bleating sheep", "a sheep baaing", "a sheep bleats"], "a sheep bleats"),
    "crow": (["a crow cawing", "a cawing crow", "a crow caws", "crows cawing"], "a crow caws"),
    "rain": (["rain falling", "the sound of rain", "rainfall", "rain pattering"], "rain falls"),
    "sea waves": (["sea waves crashing", "ocean waves", "waves breaking on the shore", "the sea"], "waves crash"),
    "crackling fire": (["a fire crackling", "a crackling fire", "the crackle of a fire", "a fire crackles"], "a fire crackles"),
    "crickets": (["crickets chirping", "chirping crickets", "the chirp of crickets", "crickets chirp"], "crickets chirp"),
    "chirping birds": (["birds chirping", "chirping birds", "birdsong", "birds tweeting"], "birds chirp"),
    "water drops": (["water dripping", "dripping water", "water drops falling", "drops of water"], "water drips"),
    "wind": (["wind blowing", "the wind howling", "a gust of wind", "wind noise"], "the wind blows"),
    "pouring water": (["water pouring", "pouring water", "someone pouring water", "water being poured"], "water is poured"),
    "toilet flush": (["a toilet flushing", "a flushing toilet", "a toilet flush", "a toilet is flushed"], "a toilet flushes"),
    "thunderstorm": (["thunder rumbling", "a thunderstorm", "rumbling thunder", "a clap of thunder"], "thunder rumbles"),
    "crying baby": (["a baby crying", "a crying baby", "an infant crying", "a baby cries"], "a baby cries"),
    "sneezing": (["someone sneezing", "a person sneezing", "a sneeze", "a person sneezes"], "someone sneezes"),
    "clapping": (["people clapping", "hands clapping", "clapping", "applause"], "someone claps"),
    "breathing": (["someone breathing", "heavy breathing", "a person breathing", "breaths"], "someone breathes"),
    "coughing": (["someone coughing", "a person coughing", "a cough", "a person coughs"], "someone coughs"),
    "footsteps": (["footsteps", "someone walking", "footsteps on the floor", "a person walking"], "someone walks"),
    "laughing": (["someone laughing", "laughter", "a person laughing", "a person laughs"], "someone laughs"),
    "brushing teeth": (["someone brushing their teeth", "teeth brushing", "a toothbrush scrubbing", "brushing teeth"], "someone brushes their teeth"),
    "snoring": (["someone snoring", "a person snoring", "snoring", "a person snores"], "someone snores"),
    "drinking sipping": (["someone drinking", "sipping a drink", "a person sipping", "gulping a drink"], "someone sips a drink"),
    "door wood knock": (["knocking on a wooden door", "a knock on the door", "door knocking", "someone knocks on a door"], "someone knocks on a door"),
    "mouse click": (["a mouse clicking", "computer mouse clicks", "the click of a mouse", "mouse clicks"], "a mouse clicks"),
    "keyboard typing": (["typing on a keyboard", "keyboard typing", "keys clacking", "someone typing"], "someone types on a keyboard"),
    "door wood creaks": (["a wooden door creaking", "a creaking door", "a door creaking", "a door creaks"], "a door creaks"),
    "can opening": (["a can being opened", "a can opening", "the pop of a can", "opening a soda can"], "a can is opened"),
    "washing machine": (["a washing machine running", "a washing machine", "a washer spinning", "a laundry machine"], "a washing machine runs"),
    "vacuum cleaner": (["a vacuum cleaner running", "a vacuum cleaner", "someone vacuuming", "a hoover running"], "a vacuum cleaner runs"),
    "clock alarm": (["an alarm clock ringing", "an alarm going off", "a ringing alarm clock", "an alarm clock"], "an alarm clock rings"),
    "clock tick": (["a clock ticking", "a ticking clock", "the tick of a clock", "a clock ticks"], "a clock ticks"),
    "glass breaking": (["glass breaking", "glass shattering", "breaking glass", "a window smashing"], "glass shatters"),
    "helicopter": (["a helicopter flying", "a helicopter", "helicopter rotor blades", "a helicopter flying overhead"], "a helicopter flies by"),
    "chainsaw": (["a chainsaw running", "a chainsaw cutting", "a chainsaw", "a buzzing chainsaw"], "a chainsaw buzzes"),
    "siren": (["a siren wailing", "a police siren", "an emergency siren", "an ambulance siren"], "a siren wails"),
    "car horn": (["a car horn honking", "a honking car horn", "a car horn", "a car honking"], "a car horn honks"),
    "engine": (["an engine running", "an engine idling", "a motor running", "an engine revving"], "an engine runs"),
    "train": (["a train passing", "a passing train", "a train going by", "a train on the tracks"], "a train passes"),
    "church bells": (["church bells ringing", "ringing church bells", "bells tolling", "church bells"], "church bells ring"),
    "airplane": (["an airplane flying", "a plane flying overhead", "an aircraft passing", "an airplane"], "an airplane flies over"),
    "fireworks": (["fireworks exploding", "fireworks popping", "fireworks going off", "fireworks"], "fireworks explode"),
    "hand saw": (["a hand saw cutting", "someone sawing wood", "a saw cutting wood", "sawing"], "someone saws wood"),
}

# Demo corpus: General MIDI instruments (fluidsynth), percussion, GM sound effects, espeak-ng speech.
# (name, article) -> "a violin playing", "violin music", "someone playing the violin", "a violin".
_INSTRUMENTS: list[tuple[str, str]] = [
    ("piano", "a"), ("grand piano", "a"), ("electric piano", "an"), ("harpsichord", "a"), ("organ", "an"),
    ("church organ", "a"), ("accordion", "an"), ("harmonica", "a"), ("acoustic guitar", "an"),
    ("electric guitar", "an"), ("guitar", "a"), ("bass guitar", "a"), ("violin", "a"), ("viola", "a"),
    ("cello", "a"), ("double bass", "a"), ("harp", "a"), ("trumpet", "a"), ("trombone", "a"),
    ("french horn", "a"), ("tuba", "a"), ("saxophone", "a"), ("clarinet", "a"), ("oboe", "an"),
    ("bassoon", "a"), ("flute", "a"), ("piccolo", "a"), ("recorder", "a"), ("pan flute", "a"),
    ("xylophone", "a"), ("marimba", "a"), ("vibraphone", "a"), ("glockenspiel", "a"), ("music box", "a"),
    ("celesta", "a"), ("banjo", "a"), ("sitar", "a"), ("bagpipe", "a"), ("timpani", "a"),
    ("steel drum", "a"), ("synthesizer", "a"), ("ocarina", "an"), ("kalimba", "a"), ("shamisen", "a"),
]
# (name, article) for percussion; article "" marks a plural name ("drums", "maracas")
_DRUMS: list[tuple[str, str]] = [
    ("drum kit", "a"), ("drums", ""), ("snare drum", "a"), ("bass drum", "a"), ("kick drum", "a"),
    ("hi-hat", "a"), ("cymbal", "a"), ("crash cymbal", "a"), ("ride cymbal", "a"), ("tom drum", "a"),
    ("tambourine", "a"), ("cowbell", "a"), ("bongo", "a"), ("conga", "a"), ("triangle", "a"),
    ("woodblock", "a"), ("claves", ""), ("maracas", ""), ("castanets", ""), ("timbale", "a"),
]
_OTHER: dict[str, tuple[list[str], str]] = {
    # GM sound effects
    "bird tweet": (["a bird tweeting", "a tweeting bird", "birds tweeting", "a bird chirping"], "a bird tweets"),
    "telephone ring": (["a telephone ringing", "a ringing phone", "a phone ringing", "a telephone rings"], "a telephone rings"),
    "telephone": (["a telephone ringing", "a ringing phone", "a phone ringing", "a telephone"], "a telephone rings"),
    "applause": (["an audience applauding", "applause", "a crowd clapping", "people applauding"], "an audience applauds"),
    "gunshot": (["a gunshot", "a gun firing", "a gun being fired", "gunfire"], "a gun fires"),
    "seashore": (["waves on a seashore", "the seashore", "waves lapping the shore", "surf"], "waves wash over the shore"),
    "breath noise": (["breath noise", "breathing noise", "a breathy sound", "air blowing"], "someone breathes"),
    "guitar fret noise": (["guitar fret noise", "fingers sliding on guitar strings", "a guitar string squeak"], "fingers slide on guitar strings"),
    "reverse cymbal": (["a reversed cymbal", "a reverse cymbal swell", "a swelling cymbal"], "a reversed cymbal swells"),
    "thunder": (["thunder rumbling", "a clap of thunder", "rumbling thunder", "thunder"], "thunder rumbles"),
    "explosion": (["an explosion", "something exploding", "a loud blast", "a boom"], "something explodes"),
    "door slam": (["a door slamming", "a slamming door", "a door slams shut"], "a door slams"),
    "car engine": (["a car engine running", "a car engine", "a motor running"], "a car engine runs"),
    "car passing": (["a car passing by", "a passing car", "a car driving past"], "a car passes by"),
    "traffic": (["traffic noise", "cars passing", "street traffic", "traffic"], "traffic passes"),
    "bell": (["a bell ringing", "a ringing bell", "a bell chiming", "a bell"], "a bell rings"),
    "whistle": (["a whistle blowing", "a blowing whistle", "a whistle"], "a whistle blows"),
    "whistling": (["someone whistling", "a person whistling", "whistling", "a whistled tune"], "someone whistles"),
    "machine gun": (["a machine gun firing", "machine gun fire", "automatic gunfire", "a machine gun"], "a machine gun fires"),
    "electric buzzing": (["an electric buzzing", "electrical buzzing", "an electric hum", "a buzzing sound"], "something buzzes electrically"),
    "heartbeat": (["a heart beating", "a heartbeat", "a beating heart", "a pulse thumping"], "a heart beats"),
    "horse": (["a horse galloping", "galloping hooves", "a galloping horse", "a horse trotting"], "a horse gallops"),
    "stream": (["a stream flowing", "a babbling brook", "running water", "a flowing stream"], "a stream flows"),
    "screaming": (["a person screaming", "someone screaming", "a scream", "a loud scream"], "someone screams"),
    "choir": (["a choir singing", "choral singing", "a choir", "voices singing together"], "a choir sings"),
    "strings": (["a string section playing", "string instruments playing", "strings", "an orchestra's strings"], "strings play"),
    "orchestra hit": (["an orchestra hit", "an orchestral stab", "a loud orchestral chord"], "an orchestra hits a chord"),
    "music": (["music playing", "music", "a song playing", "background music"], "music plays"),
    "noise": (["noise", "background noise", "static noise", "hiss"], "noise hisses"),
    # speech (espeak-ng)
    "speech": (["someone speaking", "a person talking", "speech", "a voice speaking"], "someone speaks"),
    "man speaking": (["a man speaking", "a man talking", "a male voice", "a man speaks"], "a man speaks"),
    "woman speaking": (["a woman speaking", "a woman talking", "a female voice", "a woman speaks"], "a woman speaks"),
    "male speech": (["a man speaking", "a man talking", "a male voice", "male speech"], "a man speaks"),
    "female speech": (["a woman speaking", "a woman talking", "a female voice", "female speech"], "a woman speaks"),
    "child speaking": (["a child speaking", "a child talking", "a kid's voice", "a child speaks"], "a child speaks"),
    "man": (["a man speaking", "a man talking", "a male voice"], "a man speaks"),
    "woman": (["a woman speaking", "a woman talking", "a female voice"], "a woman speaks"),
    "singing": (["someone singing", "a person singing", "a singing voice", "singing"], "someone sings"),
    "whispering": (["someone whispering", "a whisper", "a person whispering"], "someone whispers"),
    "shouting": (["someone shouting", "a person yelling", "a shout"], "someone shouts"),
}


def _builtin_entries() -> dict[str, PhraseEntry]:
    out: dict[str, PhraseEntry] = {}
    for key, (variants, clause) in {**_ESC50, **_OTHER}.items():
        out[_norm(key)] = PhraseEntry(tuple(variants), clause)
    for name, art in _INSTRUMENTS:
        a = f"{art} {name}"
        out[_norm(name)] = PhraseEntry(
            (f"{a} playing", f"{name} music", f"someone playing the {name}", f"the sound of {a}"), f"{a} plays"
        )
    for name, art in _DRUMS:
        if art:  # a single instrument: "a snare drum being hit", clause "a snare drum is hit"
            a = f"{art} {name}"
            out[_norm(name)] = PhraseEntry(
                (f"{a} being hit", f"{name} hits", f"someone playing the {name}", f"the sound of {a}"), f"{a} is hit"
            )
        else:  # plural: "drums being played", clause "drums are played"
            out[_norm(name)] = PhraseEntry(
                (f"{name} being played", name, f"someone playing the {name}", f"the sound of {name}"), f"{name} are played"
            )
    return out


# ----------------------------------------------------------------------------- rule-based fallback
_VOWEL_START = ("a", "e", "i", "o", "u")
_MASS_NOUNS = {
    "rain", "water", "wind", "music", "speech", "laughter", "applause", "noise", "traffic", "thunder",
    "fire", "static", "silence", "gunfire", "birdsong", "rustling", "snow", "hail", "steam", "smoke",
    "machinery", "typing", "chatter", "crowd noise", "white noise", "pink noise", "hiss", "hum",
}
_IRREGULAR_3RD = {"cry": "cries", "fly": "flies", "go": "goes", "do": "does", "have": "has", "buzz": "buzzes"}
# -ing stems whose base verb ends in a silent e (sneezing -> sneeze); consonant + "l" stems
# (crackling -> crackle) are handled by rule.
_E_STEMS = {
    "wheez", "sneez", "breath", "danc", "chim", "snor", "vibrat", "grat", "scrap", "slid", "bounc",
    "wip", "clos", "driv", "mov", "wav", "fad", "rid", "shak", "strik", "smok", "glid", "whin", "squeez",
    "fir", "tim", "tak", "mak", "us", "chok", "blaz", "raz",
}


_PREPOSITIONS = {"on", "in", "of", "with", "at", "from", "through", "against", "over", "under", "into", "onto", "by"}


def _head(noun: str) -> str:
    """Head of a noun phrase: the part before a preposition ("footsteps on gravel" -> "footsteps")."""
    words = noun.lower().split()
    for i, w in enumerate(words):
        if i > 0 and w in _PREPOSITIONS:
            return " ".join(words[:i])
    return " ".join(words)


def _article(noun: str) -> str:
    """'a'/'an' for a singular countable noun phrase; '' for mass/plural nouns."""
    n = noun.lower()
    head = _head(n)
    last = head.split()[-1] if head.split() else head
    if head in _MASS_NOUNS or last in _MASS_NOUNS or (last.endswith("s") and not last.endswith(("ss", "us", "is"))):
        return ""
    return "an" if n.startswith(_VOWEL_START) and not n.startswith(("uni", "use", "eu", "one")) else "a"


def _with_article(noun: str) -> str:
    art = _article(noun)
    return f"{art} {noun}" if art else noun


def _plural_subject(noun: str) -> bool:
    head = _head(noun).split()
    return bool(head) and _article(noun) == "" and head[-1].endswith("s")


def _third_person(verb: str) -> str:
    """Present tense, third person singular, of a base verb ("bark" -> "barks", "cry" -> "cries")."""
    if verb in _IRREGULAR_3RD:
        return _IRREGULAR_3RD[verb]
    if verb.endswith(("s", "sh", "ch", "x", "z")):
        return verb + "es"
    if verb.endswith("y") and len(verb) > 1 and verb[-2] not in "aeiou":
        return verb[:-1] + "ies"
    return verb + "s"


def _base_from_ing(word: str) -> str:
    """Base verb from an -ing form, by rule ("barking" -> "bark", "running" -> "run",
    "crackling" -> "crackle"); good enough for sound verbs, not a full English morphology."""
    stem = word[:-3]
    if len(stem) >= 3 and stem[-1] == stem[-2] and stem[-1] not in "lszrf":
        stem = stem[:-1]  # running -> run, humming -> hum (but rolling, hissing, buzzing, purring keep both)
    if stem in _E_STEMS or (len(stem) > 2 and stem.endswith("l") and stem[-2] not in "aeiouwrl"):
        stem = stem + "e"  # sneezing -> sneeze, crackling -> crackle (not howling, rolling)
    return stem


def _is_ing(word: str) -> bool:
    return len(word) > 4 and word.endswith("ing") and word not in {"thing", "string", "ring", "king", "wing", "spring", "ceiling"}


def _fallback_entry(label: str) -> PhraseEntry:
    """Natural phrasings for a label without a hand-written entry.

    Rules: underscores -> spaces; "<noun> <verb>ing" ("dog barking") and "<verb>ing <noun>"
    ("crying baby") get an article and both word orders; a lone "-ing" word gets "someone";
    anything else is treated as a noun phrase ("vacuum cleaner" -> "a vacuum cleaner").
    """
    text = _norm(label)
    words = text.split()
    if not words:
        raise ValueError("empty label")
    # already a phrase with a subject ("a violin playing", "the wind howling", "someone laughing")
    if words[0] in ("a", "an", "the", "someone", "somebody", "people") and len(words) >= 2:
        ing = [i for i, w in enumerate(words) if _is_ing(w)]
        if ing and ing[-1] == len(words) - 1:
            subj = " ".join(words[: ing[-1]])
            noun = " ".join(words[1 : ing[-1]])
            verb = _base_from_ing(words[-1])
            plural = words[0] == "people" or (noun != "" and _plural_subject(noun))
            verb3 = verb if plural else _third_person(verb)
            alt = f"{words[-1]} {noun}" if noun else " ".join(words[1:])
            return PhraseEntry((text, alt, f"{subj} {verb3}"), f"{subj} {verb3}")
        return PhraseEntry((text, " ".join(words[1:]), f"the sound of {text}"), f"{text} is heard")
    if len(words) >= 2 and _is_ing(words[-1]):  # "dog barking" -> "a dog barking"
        noun = " ".join(words[:-1])
        verb = _base_from_ing(words[-1])
        subj = _with_article(noun)
        verb3 = verb if _plural_subject(noun) else _third_person(verb)
        return PhraseEntry(
            (f"{subj} {words[-1]}", _with_article(f"{words[-1]} {noun}"), f"{noun} {words[-1]}", f"{subj} {verb3}"),
            f"{subj} {verb3}",
        )
    if len(words) >= 2 and _is_ing(words[0]):  # "crying baby" -> "a baby crying"
        noun = " ".join(words[1:])
        verb = _base_from_ing(words[0])
        subj = _with_article(noun)
        verb3 = verb if _plural_subject(noun) else _third_person(verb)
        return PhraseEntry(
            (f"{subj} {words[0]}", _with_article(text), text, f"{subj} {verb3}"), f"{subj} {verb3}"
        )
    if len(words) == 1 and _is_ing(words[0]):  # "laughing" -> "someone laughing"
        verb = _base_from_ing(words[0])
        return PhraseEntry((f"someone {words[0]}", words[0], f"a person {words[0]}"), f"someone {_third_person(verb)}")
    noun = text
    subj = _with_article(noun)
    return PhraseEntry((subj, noun, f"the sound of {subj}"), f"{subj} {'are' if _plural_subject(noun) else 'is'} heard")


# ----------------------------------------------------------------------------- PhraseBank


@dataclass
class PhraseBank:
    """Label -> natural phrasings.

    entries: normalised label -> PhraseEntry. Lookups normalise the label (case, underscores) and
    also match any known variant, so "a violin playing" finds the "violin" entry. Labels with no
    entry get a rule-based fallback (`_fallback_entry`), never an error.
    """

    entries: dict[str, PhraseEntry] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._keys: dict[str, str] = {}
        self._alias: dict[str, str] = {}
        for key in self.entries:
            self._keys.setdefault(_norm(key), key)
        for key, e in self.entries.items():
            for v in e.variants:
                self._alias.setdefault(_norm(v), key)
            self._alias.setdefault(_norm(e.clause), key)

    @classmethod
    def default(cls) -> "PhraseBank":
        """Hand-written entries for ESC-50 and the demo corpus."""
        return cls(_builtin_entries())

    def entry(self, label: str) -> PhraseEntry:
        """The entry for `label`: exact/normalised key, else a known variant, else the fallback."""
        if label in self.entries:
            return self.entries[label]
        k = _norm(label)
        if not k:
            raise ValueError("empty label")
        if k in self._keys:
            return self.entries[self._keys[k]]
        if k in self._alias:
            return self.entries[self._alias[k]]
        return _fallback_entry(label)

    def variants(self, label: str) -> list[str]:
        """Natural phrasings of `label`, canonical first (e.g. dog -> ["a dog barking", ...])."""
        return list(self.entry(label).variants)

    def canonical(self, label: str) -> str:
        """The preferred phrase for `label` ("chirping_birds" -> "birds chirping")."""
        return self.entry(label).variants[0]

    def clause(self, label: str) -> str:
        """Sentence form that takes a count adverb ("a dog barks" -> "a dog barks twice")."""
        return self.entry(label).clause

    def add(self, label: str, variants: Sequence[str], clause: str | None = None) -> None:
        """Add or replace an entry (clause defaults to "<first variant> is heard")."""
        e = PhraseEntry(tuple(variants), clause or f"{variants[0]} is heard")
        k = _norm(label)
        self.entries[k] = e
        self._keys[k] = k
        for v in e.variants:
            self._alias[_norm(v)] = k

    def for_labels(self, labels: Iterable[str]) -> "PhraseBank":
        """A bank with one resolved entry per label (built-in or fallback), keyed by the label as
        it appears in the data; this is what is saved with a dataset."""
        out: dict[str, PhraseEntry] = {}
        for lab in sorted(set(labels)):
            out[lab] = self.entry(lab)
        return PhraseBank(out)  # keys kept verbatim so they match the data's labels

    def as_mapping(self, labels: Iterable[str] | None = None) -> dict[str, list[str]]:
        """label -> variants (for `PhraseClusters.build(labels, variants=...)`)."""
        keys = sorted(set(labels)) if labels is not None else sorted(self.entries)
        return {k: self.variants(k) for k in keys}

    def to_json(self) -> dict[str, Any]:
        """JSON-serialisable form, sorted for byte-stable files."""
        return {
            "format": "finelap.phrase_bank",
            "version": 1,
            "entries": {k: {"variants": list(e.variants), "clause": e.clause} for k, e in sorted(self.entries.items())},
        }

    def save(self, path: str | Path) -> None:
        from ..utils import write_json_atomic

        write_json_atomic(path, self.to_json())

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | str | Path) -> "PhraseBank":
        """Load from `to_json()` output or a path to a saved `phrase_bank.json`."""
        src: object = "<dict>"
        if isinstance(data, (str, Path)):
            src = data
            try:
                data = json.loads(Path(data).read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise DataFormatError(src, f"invalid JSON ({e.msg})", e.lineno) from None
        if not isinstance(data, Mapping) or not isinstance(data.get("entries"), Mapping):
            raise DataFormatError(src, "not a phrase bank: expected an object with an 'entries' mapping")
        entries: dict[str, PhraseEntry] = {}
        for k, v in data["entries"].items():
            try:
                entries[str(k)] = PhraseEntry(tuple(v["variants"]), str(v["clause"]))
            except (KeyError, TypeError, ValueError) as e:
                raise DataFormatError(src, f"bad entry for label {k!r}: {e}") from None
        return cls(entries)


# ----------------------------------------------------------------------------- captions

_NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"]


def number_word(n: int) -> str:
    return _NUMBERS[n] if 0 <= n < len(_NUMBERS) else str(n)


def count_adverb(n: int) -> str:
    """1 -> 'once', 2 -> 'twice', 3 -> 'three times', ... ('several times' above ten)."""
    if n == 1:
        return "once"
    if n == 2:
        return "twice"
    return f"{number_word(n)} times" if n <= 10 else "several times"


def _cap(s: str) -> str:
    s = s.strip()
    return (s[:1].upper() + s[1:]) if s else s


def _sentence(s: str) -> str:
    s = _cap(s)
    return s if s.endswith((".", "!", "?")) else s + "."


def _join(items: Sequence[str], conj: str = "and") -> str:
    items = list(items)
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + f" {conj} " + items[-1]


@dataclass
class _Group:
    """Events of one label: either all of them (count summaries) or a run of consecutive ones."""

    label: str
    onsets: list[float]
    offsets: list[float]
    repeated: bool  # at least one event is a looped (repeated) source

    @property
    def count(self) -> int:
        return len(self.onsets)

    @property
    def start(self) -> float:
        return min(self.onsets)

    @property
    def end(self) -> float:
        return max(self.offsets)

    def overlaps(self, other: "_Group") -> bool:
        return any(a < d - 1e-6 and c < b - 1e-6 for a, b in zip(self.onsets, self.offsets) for c, d in zip(other.onsets, other.offsets))


def _sorted_events(events: Sequence[Event], repeats: Sequence[int] | None) -> list[tuple[Event, bool]]:
    order = sorted(range(len(events)), key=lambda i: (events[i].onset, events[i].offset, events[i].label))
    return [(events[i], bool(repeats is not None and repeats[i] > 1)) for i in order]


def _groups(events: Sequence[Event], repeats: Sequence[int] | None) -> list[_Group]:
    """One group per label, in order of first appearance."""
    groups: dict[str, _Group] = {}
    for e, rep in _sorted_events(events, repeats):
        g = groups.setdefault(e.label, _Group(e.label, [], [], False))
        g.onsets.append(float(e.onset))
        g.offsets.append(float(e.offset))
        g.repeated |= rep
    return list(groups.values())


def _runs(events: Sequence[Event], repeats: Sequence[int] | None) -> list[_Group]:
    """Consecutive events (by onset) of the same label merged into runs: dog, dog, horn, dog ->
    [dog x2, horn, dog]."""
    runs: list[_Group] = []
    for e, rep in _sorted_events(events, repeats):
        if runs and runs[-1].label == e.label:
            runs[-1].onsets.append(float(e.onset))
            runs[-1].offsets.append(float(e.offset))
            runs[-1].repeated |= rep
        else:
            runs.append(_Group(e.label, [float(e.onset)], [float(e.offset)], rep))
    return runs


_THROUGHOUT = ("throughout", "all the way through", "for most of the clip")
_WHEN = {
    "start": ("at the start", "at the beginning", "early on"),
    "middle": ("in the middle", "midway through", "halfway through"),
    "end": ("towards the end", "near the end", "at the end"),
}


def _bucket(onset: float, offset: float, duration: float) -> str:
    """Rough timing of one event: 'start' / 'middle' / 'end' third (by midpoint) or 'throughout'."""
    if duration <= 0 or (offset - onset) >= 0.7 * duration:
        return "throughout"
    mid = 0.5 * (onset + offset) / duration
    return "start" if mid < 1 / 3 else ("middle" if mid < 2 / 3 else "end")


def _when(bucket: str, rng: np.random.Generator) -> str:
    return str(rng.choice(_THROUGHOUT if bucket == "throughout" else _WHEN[bucket]))


def _count_suffix(g: _Group) -> str:
    if g.count > 1:
        return " " + count_adverb(g.count)
    if g.repeated:
        return " repeatedly"
    return ""


def _style_order(events: Sequence[Event], repeats: Sequence[int] | None, bank: PhraseBank, duration: float,
                 rng: np.random.Generator) -> str:
    """'A dog barks twice, then a car horn honks while rain falls, then a dog barks again.'"""
    runs = _runs(events, repeats)
    seen: set[str] = set()
    parts: list[str] = []
    for i, r in enumerate(runs):
        clause = bank.clause(r.label) + _count_suffix(r) + (" again" if r.label in seen else "")
        seen.add(r.label)
        if i == 0:
            parts.append(clause)
            continue
        conn = str(rng.choice(["while", "as"])) if r.overlaps(runs[i - 1]) else str(rng.choice(["then", "and then", "after that"]))
        parts.append(f"{conn} {clause}")
    return _sentence(", ".join(parts))


def _style_timing(events: Sequence[Event], repeats: Sequence[int] | None, bank: PhraseBank, duration: float,
                  rng: np.random.Generator) -> str:
    """'At the start, a dog barks twice; in the middle, a car horn honks; rain falls throughout.'"""
    buckets: dict[str, list[_Group]] = {}
    for e, rep in _sorted_events(events, repeats):
        b = _bucket(e.onset, e.offset, duration)
        lst = buckets.setdefault(b, [])
        g = next((x for x in lst if x.label == e.label), None)
        if g is None:
            lst.append(_Group(e.label, [float(e.onset)], [float(e.offset)], rep))
        else:
            g.onsets.append(float(e.onset))
            g.offsets.append(float(e.offset))
            g.repeated |= rep
    seen: set[str] = set()
    items: list[str] = []
    for b in ("start", "middle", "end"):
        if b not in buckets:
            continue
        clauses = []
        for g in buckets[b]:
            clauses.append(bank.clause(g.label) + _count_suffix(g) + (" again" if g.label in seen else ""))
            seen.add(g.label)
        items.append(f"{_when(b, rng)}, {_join(clauses)}")
    for g in buckets.get("throughout", []):
        items.append(f"{bank.clause(g.label)}{_count_suffix(g)} {_when('throughout', rng)}")
    return _sentence("; ".join(items))


def _style_count(events: Sequence[Event], repeats: Sequence[int] | None, bank: PhraseBank, duration: float,
                 rng: np.random.Generator) -> str:
    """'Three sound events: a dog barking twice and a car horn honking.'"""
    groups = _groups(events, repeats)
    n = sum(g.count for g in groups)
    parts = [bank.canonical(g.label) + (" " + count_adverb(g.count) if g.count > 1 else "") for g in groups]
    head = str(rng.choice(["{n} sound events", "{n} sounds in total", "a clip with {n} sound events"])).format(n=number_word(n))
    if n == 1:
        head = str(rng.choice(["a single sound event", "one sound event", "just one sound"]))
    return _sentence(f"{head}: {_join(parts)}")


def _style_tags(events: Sequence[Event], repeats: Sequence[int] | None, bank: PhraseBank, duration: float,
                rng: np.random.Generator) -> str:
    """Short tag-like phrase with random variants: 'A barking dog, a car horn and rainfall.'"""
    parts = []
    for g in _groups(events, repeats):
        vs = bank.variants(g.label)
        parts.append(vs[int(rng.integers(len(vs)))])
    return _sentence(_join(parts))


def _style_frame(events: Sequence[Event], repeats: Sequence[int] | None, bank: PhraseBank, duration: float,
                 rng: np.random.Generator) -> str:
    """'It begins with a dog barking and ends with a car horn honking.'"""
    groups = _groups(events, repeats)
    if len(groups) == 1:
        g = groups[0]
        return _sentence(f"{bank.canonical(g.label)}{_count_suffix(g)} {_when(_bucket(g.start, g.end, duration), rng)}")
    first = groups[0]
    last = max(groups, key=lambda g: (g.end, g.start))
    if last is first:
        last = groups[-1]
    middle = [g for g in groups if g is not first and g is not last]
    s = f"it begins with {bank.canonical(first.label)}"
    if middle:
        s += f", then {_join([bank.canonical(g.label) for g in middle])}"
    s += f" and ends with {bank.canonical(last.label)}"
    return _sentence(s)


_STYLES = (_style_order, _style_timing, _style_count, _style_tags, _style_frame)


def caption_soundscape(
    events: Sequence[Event],
    duration: float,
    bank: PhraseBank,
    rng: np.random.Generator,
    n: int = 3,
    repeats: Sequence[int] | None = None,
    background: str | None = None,
) -> list[str]:
    """`n` distinct phrasings of one soundscape, mentioning order, count and rough timing.

    events: the soundscape's labelled events (any order; sorted by onset here).
    duration: soundscape length in seconds (for "at the start" / "towards the end").
    repeats: per event, how many times its source was looped (>1 reads as "repeatedly").
    background: optional phrase for the background ("street noise"), mentioned in one caption.
    Deterministic for a given `rng` state.
    """
    if n <= 0:
        return []
    if not events:
        return [_sentence(background + " only" if background else "background noise only")][:n]
    order = rng.permutation(len(_STYLES))
    out: list[str] = []
    for k in range(n):
        style = _STYLES[int(order[k % len(_STYLES)])]
        text = style(events, repeats, bank, duration, rng)
        if background and k == 0:
            text = text[:-1] + f", with {background} in the background."
        out.append(text)
    # repeated styles (n > number of styles) can collide; keep distinct ones, order preserved
    seen: set[str] = set()
    uniq = [c for c in out if not (c in seen or seen.add(c))]
    return uniq


def load_captioner(spec: str) -> Captioner:
    """Import an external captioner given as "module:function".

    The function is called as `fn(events: list[Event], duration: float) -> list[str]`. Off by
    default; finelap never downloads anything for it.
    """
    if ":" not in spec:
        raise ConfigError(f"captioner must be 'module:function', got {spec!r}")
    mod_name, fn_name = spec.split(":", 1)
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise ConfigError(f"cannot import captioner module {mod_name!r}: {e}") from None
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise ConfigError(f"captioner {spec!r}: {fn_name!r} is not a callable in module {mod_name!r}")
    return fn
