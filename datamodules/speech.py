"""Offline text-to-speech with eSpeak NG, driven through ctypes (the library and voice data bundled by
``espeakng-loader``; no subprocess and no system install).

Example:
    >>> from datamodules.speech import SAMPLE_RATE, available_voices, synthesize
    >>> wav = synthesize("seven", voice="en-us", rate=200, pitch=60)  # int16, mono, SAMPLE_RATE Hz
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import os
import shutil
import tempfile
import threading

import _ctypes
import espeakng_loader
import numpy as np

__all__ = ["MAX_PITCH", "MAX_RATE", "MIN_PITCH", "MIN_RATE", "SAMPLE_RATE", "available_voices", "synthesize"]

SAMPLE_RATE = 22050
MIN_RATE, MAX_RATE = 80, 450  # words per minute, espeakRATE_MINIMUM / espeakRATE_MAXIMUM in speak_lib.h
MIN_PITCH, MAX_PITCH = 0, 99

# Constants from espeak-ng's speak_lib.h.
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POS_CHARACTER = 1
_espeakCHARS_UTF8 = 1
_espeakRATE = 1
_espeakPITCH = 3
_EE_OK = 0

# int SynthCallback(short *wav, int numsamples, espeak_EVENT *events); the events are not needed here.
_SYNTH_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)

# Variant files left out of available_voices: "fast" only tunes speeds above MAX_RATE, so it sounds like its
# base voice.
_NOT_A_VARIANT = frozenset({"fast"})

_lock = threading.Lock()  # eSpeak NG keeps its whole synthesis state in globals: one call at a time.
_private_library: str | None = None
_chunks: list[np.ndarray] = []


def _collect(wav, numsamples: int, events) -> int:
    if wav and numsamples > 0:
        _chunks.append(np.ctypeslib.as_array(wav, shape=(numsamples,)).copy())
    return 0


# Module-level so that ctypes never frees the trampoline while the library may still call it.
_collect_callback = _SYNTH_CALLBACK(_collect)


def _data_path() -> str:
    return espeakng_loader.get_data_path()


def _private_library_path() -> str:
    """Path of this module's own copy of libespeak-ng (made once, removed at exit).

    A copy under another path is a separate object for the dynamic loader, so unloading it really drops its
    state even when other code in the process (e.g. a phonemizer) has loaded the bundled library.
    """
    global _private_library
    if _private_library is None:
        directory = tempfile.mkdtemp(prefix="balance-espeak-")
        atexit.register(shutil.rmtree, directory, ignore_errors=True)
        source = espeakng_loader.get_library_path()
        _private_library = shutil.copy(source, os.path.join(directory, os.path.basename(source)))
    return _private_library


def _open_library() -> ctypes.CDLL:
    lib = ctypes.CDLL(_private_library_path())
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.espeak_Initialize.restype = ctypes.c_int
    lib.espeak_SetSynthCallback.argtypes = [_SYNTH_CALLBACK]
    lib.espeak_SetSynthCallback.restype = None
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_SetVoiceByName.restype = ctypes.c_int
    lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.espeak_SetParameter.restype = ctypes.c_int
    lib.espeak_Synth.argtypes = [
        ctypes.c_void_p,  # text
        ctypes.c_size_t,  # size
        ctypes.c_uint,  # position
        ctypes.c_int,  # position_type
        ctypes.c_uint,  # end_position
        ctypes.c_uint,  # flags
        ctypes.POINTER(ctypes.c_uint),  # unique_identifier
        ctypes.c_void_p,  # user_data
    ]
    lib.espeak_Synth.restype = ctypes.c_int
    lib.espeak_Synchronize.argtypes = []
    lib.espeak_Synchronize.restype = ctypes.c_int
    lib.espeak_Terminate.argtypes = []
    lib.espeak_Terminate.restype = ctypes.c_int
    lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
    lib.espeak_ng_SetRandSeed.restype = ctypes.c_int
    return lib


@functools.lru_cache(maxsize=1)
def _variant_names() -> frozenset[str]:
    directory = os.path.join(_data_path(), "voices", "!v")
    if not os.path.isdir(directory):
        return frozenset()
    return frozenset(name for name in os.listdir(directory) if os.path.isfile(os.path.join(directory, name)))


@functools.lru_cache(maxsize=1)
def _language_voices() -> dict[str, bool]:
    """Maps each language voice name to whether the bundled data has its pronunciation dictionary."""
    data = _data_path()
    voices = {}
    for directory, _, files in os.walk(os.path.join(data, "lang")):
        for name in files:
            with open(os.path.join(directory, name), encoding="utf-8", errors="replace") as file:
                fields = [line.split() for line in file]
            languages = [field[1] for field in fields if len(field) > 1 and field[0] == "language"]
            dictionaries = [field[1] for field in fields if len(field) > 1 and field[0] == "dictionary"]
            # eSpeak NG's rule: the "dictionary" entry, else the first language's code up to its first "-".
            if dictionaries:
                dictionary = dictionaries[0]
            else:
                dictionary = languages[0].split("-")[0] if languages else name
            # eSpeak NG matches a voice name against the voice file's name, case-insensitively.
            voices[name.lower()] = os.path.isfile(os.path.join(data, f"{dictionary}_dict"))
    return voices


def available_voices(language_prefix: str = "en") -> list[str]:
    """Lists the voice names that ``synthesize`` accepts for a language, from the bundled voice data.

    Each language voice whose pronunciation dictionary is bundled (e.g. ``"en"``, ``"en-us"``,
    ``"en-gb-scotland"``) is listed on its own and combined with every voice variant as
    ``"<voice>+<variant>"`` (e.g. ``"en+f3"``, ``"en-us+klatt"``, ``"en+Alex"``; variant names are
    case-sensitive).

    Args:
        language_prefix: keep the language voices whose name starts with this (case-insensitive);
            ``""`` keeps all of them.

    Returns:
        The voice names, sorted.
    """
    prefix = language_prefix.lower()
    bases = [name for name, usable in _language_voices().items() if usable and name.startswith(prefix)]
    variants = sorted(_variant_names() - _NOT_A_VARIANT)
    return sorted(bases + [f"{base}+{variant}" for base in bases for variant in variants])


def synthesize(text: str, voice: str = "en", rate: int = 175, pitch: int = 50) -> np.ndarray:
    """Speaks ``text`` with eSpeak NG.

    The same arguments always give the same samples.

    Args:
        text: the text to speak (UTF-8 encodable, not blank).
        voice: an eSpeak NG voice name, optionally with a variant: ``"en"``, ``"en-us"``, ``"en+f3"``;
            see ``available_voices``.
        rate: speaking rate in words per minute, ``MIN_RATE`` (80) to ``MAX_RATE`` (450).
        pitch: base pitch, ``MIN_PITCH`` (0) to ``MAX_PITCH`` (99); 50 is the voice's normal pitch.

    Returns:
        The mono waveform as int16 samples at ``SAMPLE_RATE`` Hz.

    Raises:
        ValueError: if ``text`` is blank or holds a NUL character, or ``rate`` or ``pitch`` is out of range.
        RuntimeError: if eSpeak NG does not know the voice or variant, or fails to initialise or synthesise.
    """
    if not text or not text.strip():
        raise ValueError("text must not be empty")
    if "\0" in text:
        raise ValueError("text must not contain NUL characters")
    if not MIN_RATE <= rate <= MAX_RATE:
        raise ValueError(f"rate must be in [{MIN_RATE}, {MAX_RATE}] words per minute, got {rate}")
    if not MIN_PITCH <= pitch <= MAX_PITCH:
        raise ValueError(f"pitch must be in [{MIN_PITCH}, {MAX_PITCH}], got {pitch}")
    # eSpeak NG silently ignores an unknown variant and speaks with the plain voice.
    base, plus, variant = voice.partition("+")
    if plus and variant not in _variant_names():
        raise RuntimeError(f"eSpeak NG has no voice variant {variant!r} (voice {voice!r})")
    # eSpeak NG accepts such a voice but, lacking the dictionary, speaks next to nothing.
    if not _language_voices().get(base.lower(), True):
        raise RuntimeError(f"the bundled eSpeak NG data has no dictionary for voice {voice!r}")
    encoded = text.encode("utf-8") + b"\0"

    with _lock:
        # A fresh library instance per call: eSpeak NG carries waveform state (pitch flutter phase, gain,
        # echo) from one utterance to the next, even across espeak_Terminate/espeak_Initialize, so only
        # reloading makes repeated calls give identical samples. Reloading costs about 2 ms.
        lib = _open_library()
        try:
            return _synthesize_with(lib, encoded, voice, rate, pitch)
        finally:
            lib.espeak_Terminate()
            _ctypes.dlclose(lib._handle)
            _chunks.clear()


def _synthesize_with(lib: ctypes.CDLL, encoded: bytes, voice: str, rate: int, pitch: int) -> np.ndarray:
    reported_rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, _data_path().encode(), 0)
    if reported_rate < 0:
        raise RuntimeError(f"espeak_Initialize failed with the data in {_data_path()}")
    if reported_rate != SAMPLE_RATE:
        raise RuntimeError(f"eSpeak NG synthesises at {reported_rate} Hz, expected {SAMPLE_RATE} Hz")
    lib.espeak_SetSynthCallback(_collect_callback)
    lib.espeak_ng_SetRandSeed(0)
    if lib.espeak_SetVoiceByName(voice.encode("utf-8")) != _EE_OK:
        raise RuntimeError(f"eSpeak NG has no voice {voice!r}; see available_voices()")
    for parameter, name, value in ((_espeakRATE, "rate", rate), (_espeakPITCH, "pitch", pitch)):
        if lib.espeak_SetParameter(parameter, value, 0) != _EE_OK:
            raise RuntimeError(f"espeak_SetParameter({name}={value}) failed")
    _chunks.clear()
    status = lib.espeak_Synth(encoded, len(encoded), 0, _POS_CHARACTER, 0, _espeakCHARS_UTF8, None, None)
    if status != _EE_OK:
        raise RuntimeError(f"espeak_Synth failed with status {status}")
    if lib.espeak_Synchronize() != _EE_OK:
        raise RuntimeError("espeak_Synchronize failed")
    if not _chunks:
        return np.zeros(0, dtype=np.int16)
    return np.concatenate(_chunks).astype(np.int16, copy=False)
