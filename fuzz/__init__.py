"""Coverage-guided fuzzing of the agent's untrusted-input surfaces (issue 15, point 6).

Every target in `fuzz.targets` is a plain function of one byte string that raises only on a
bug: the errors a component documents as its way to refuse bad input are caught inside the
target, anything else escapes and is a crash. The targets import no fuzzing engine, so tests
replay the committed seeds and past crashes through them directly; `python -m fuzz.run` (and
`make fuzz`) drives them with atheris/libFuzzer. `python -m fuzz.corpus` rewrites the seeds.
"""
