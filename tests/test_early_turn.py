"""A turn started at a pause: the speech so far is transcribed as soon as the caller pauses (shown as
a partial line), and the model starts answering it while the VAD still waits to be sure the caller
has finished. The answer is kept if they said nothing more, and dropped if they went on."""

from __future__ import annotations

import asyncio
from typing import Any

from scripted_engines import ScriptedASR, ScriptedLLM

from avatar_rtc.testing.mic import ScriptedMic
from avatar_rtc.testing.receiver import CallReceiver, is_final_answer
from avatar_rtc.testing.speech import spoken_clip

# The VAD waits this long before it decides the utterance is over, so the early transcript (started at
# a 150 ms pause) and the early answer come well before it.
END_SILENCE_MS = 1500
SLOW_END = {"conversation": {"vad": {"end_silence_ms": END_SILENCE_MS}}}


def _user_transcripts(receiver: CallReceiver) -> list[dict[str, Any]]:
    return [e for e in receiver.events if e["type"] == "transcript" and e["role"] == "user"]


async def _call(server: Any, mic: ScriptedMic) -> CallReceiver:
    receiver = CallReceiver(mic=mic)
    await receiver.join(server.url)
    return receiver


async def test_an_answer_started_at_the_pause_is_kept_when_the_caller_has_finished(make_server) -> None:
    question = "What is the capital of France?"
    llm = ScriptedLLM(["Paris is the capital of France."])
    server = await make_server(llm=llm, asr=ScriptedASR({0.5: question}), settings=SLOW_END)
    mic = ScriptedMic()
    receiver = await _call(server, mic)
    mic.play(spoken_clip(question))
    answer = await receiver.wait_event(is_final_answer, wait_s=60)
    metrics = await receiver.wait_event(lambda e: e["type"] == "metrics" and e["turn"] == "voice")
    await receiver.close()

    users = _user_transcripts(receiver)
    print(f"user transcripts {users}; metrics {metrics}")
    # The partial line came at the pause, the final one once the VAD was sure; both say the question.
    assert [e["final"] for e in users] == [False, True]
    assert all(e["text"] == question for e in users)
    # The model was asked once, before the VAD had decided, and its answer is what was spoken.
    assert len(llm.requests) == 1 and llm.requests[0][-1]["content"] == users[-1]["text"]
    assert metrics.get("early_llm") is True and metrics.get("early_asr") is True
    assert metrics["llm_first_token_ms"] < metrics["vad_end_ms"]
    assert answer["text"] == "Paris is the capital of France."


async def test_speech_after_the_pause_drops_the_early_answer(make_server) -> None:
    # The first answer comes slowly, so it is still coming when the caller goes on.
    llm = ScriptedLLM(["An answer to half a question, " * 10, "Paris."], word_delay_s=0.2)
    first, rest = spoken_clip("What is the capital"), spoken_clip("of France?")
    # Speech up to the first pause: the first part, the VAD's start padding (300 ms) and the pause
    # (150 ms); anything longer holds some of the rest too.
    first_part_s = len(first) / 48000 + 0.3 + 0.15 + 0.1
    asr = ScriptedASR({0.5: "What is the capital", first_part_s: "What is the capital of France?"})
    server = await make_server(llm=llm, asr=asr, settings=SLOW_END)
    mic = ScriptedMic()
    receiver = await _call(server, mic)
    mic.play(first)
    # The caller goes on once the early answer has been asked for, well before the VAD's wait is over.
    await receiver.wait_event(lambda e: e["type"] == "transcript" and e["role"] == "user", wait_s=4.0)
    assert not _user_transcripts(receiver)[0]["final"]
    for _ in range(50):
        if llm.requests:
            break
        await asyncio.sleep(0.01)
    mic.play(rest)
    answer = await receiver.wait_event(is_final_answer, wait_s=60)
    metrics = await receiver.wait_event(lambda e: e["type"] == "metrics" and e["turn"] == "voice")
    await receiver.close()

    users = _user_transcripts(receiver)
    print(f"user transcripts {users}; requests {llm.requests}; metrics {metrics}")
    asked = [request[-1]["content"] for request in llm.requests]
    # The model was asked about the first half at the pause, then about the whole question; only
    # the second answer was spoken, and the history holds the whole question once.
    assert len(asked) == 2, asked
    assert asked == ["What is the capital", "What is the capital of France?"]
    assert users[-1]["final"] and users[-1]["text"] == asked[1]
    assert answer["text"] == "Paris."
    # The half-question's answer stopped as soon as the caller spoke again, not at their next pause.
    stopped = llm.stopped_at[0]
    resumed = mic.clip_started_at[-1]
    assert stopped is not None and stopped - resumed < 0.4, (stopped, resumed)
    # The second answer was started early too, at the pause after the whole question.
    assert metrics.get("early_llm") is True
