"""History hygiene: the model is told the call's language, and a reply that drifts into another language
or repeats itself is not fed back to it verbatim (trimmed to its clean sentences, or dropped)."""

from __future__ import annotations

import asyncio

from scripted_engines import ScriptedLLM

from avatar_rtc.conversation.hygiene import reply_for_history
from avatar_rtc.conversation.llm import ConversationHistory
from avatar_rtc.media.spoken_text import join_spoken
from avatar_rtc.testing.receiver import CallReceiver, is_final_answer

# --- the rule on its own ------------------------------------------------------------------------------


def test_clean_replies_are_kept_verbatim_even_when_they_quote_another_script() -> None:
    for reply, language in [
        ("Paris is the capital of France. It is lovely in spring!", "en"),
        ("The Chinese for hello is 你好.", "en"),
        ("Seven times eight is 56.", "en"),
        ("It was 1.5. Now it is 2.5.", "en"),  # a decimal point ends no sentence
        ("巴黎是法国的首都。我喜欢用Python编程。", "zh"),
    ]:
        assert reply_for_history(reply, language) == reply


def test_a_reply_that_drifts_into_another_language_is_cut_before_the_drift() -> None:
    assert (
        reply_for_history("Paris is the capital of France. 巴黎是一个美丽的城市。", "en")
        == "Paris is the capital of France."
    )
    assert reply_for_history("我不知道你在说什么。", "en") == ""
    assert reply_for_history("Привет, как дела?", "en") == ""
    # In a Mandarin call an English sentence is the drift.
    assert reply_for_history("巴黎是法国的首都。Paris is also very beautiful.", "zh") == "巴黎是法国的首都。"


def test_a_reply_that_repeats_itself_is_cut_at_the_first_repeat() -> None:
    assert reply_for_history("I like cats. I like cats. I like cats.", "en") == "I like cats."
    assert (
        reply_for_history("I am here to help. I am here to help you. I am here to help you today.", "en")
        == "I am here to help."
    )
    assert reply_for_history("the the the the the the the the", "en") == ""
    assert reply_for_history("Sure, sure, sure, sure, sure, sure.", None) == ""


# --- in the history ---------------------------------------------------------------------------------------


def test_the_system_prompt_names_the_calls_language() -> None:
    english = ConversationHistory("Be brief.", language="en")
    assert english.messages()[0] == {"role": "system", "content": "Be brief. Always reply in English."}
    mandarin = ConversationHistory("Be brief.", language="zh")
    assert "简体中文" in mandarin.messages()[0]["content"]


def test_drifting_and_repetitive_replies_stay_out_of_the_history() -> None:
    history = ConversationHistory("Be brief.", language="en")
    history.add_user("What is the capital of France?")
    history.add_assistant("Paris is the capital of France. 巴黎是一个美丽的城市。")
    history.add_user("And of Spain?")
    history.add_assistant("Madrid. Madrid. Madrid. Madrid.")
    history.add_user("Say something in your language.")
    history.add_assistant("我不知道。")  # nothing clean: dropped; the next question joins this one
    history.add_user("Thanks!")
    assert history.messages()[1:] == [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris is the capital of France."},
        {"role": "user", "content": "And of Spain?"},
        {"role": "assistant", "content": "Madrid."},
        {"role": "user", "content": "Say something in your language.\nThanks!"},
    ]


# --- over a real call -------------------------------------------------------------------------------------


async def test_a_call_hears_the_whole_reply_but_the_model_is_not_fed_its_drift(make_server) -> None:
    drifting = "Paris is the capital of France. 巴黎很美。"
    llm = ScriptedLLM([drifting, "You are welcome."])
    server = await make_server(llm=llm)
    receiver = CallReceiver()
    await receiver.join(server.url)
    receiver.send({"type": "chat", "text": "What is the capital of France?"})
    first = await receiver.wait_event(is_final_answer, wait_s=30)
    after_first = len(receiver.events)
    receiver.send({"type": "chat", "text": "Thanks!"})
    await receiver.wait_event(is_final_answer, wait_s=30, after=after_first)
    await receiver.close()
    # Every request named the call it was for (the key the model keeps its prompt under), and the
    # model was told to forget the call once it ended.
    assert receiver.session_id and set(llm.sessions) == {receiver.session_id}
    for _ in range(100):
        if llm.forgotten:
            break
        await asyncio.sleep(0.05)
    assert llm.forgotten == [receiver.session_id]

    # What the caller heard and saw: the whole reply, its sentences joined as the page shows them.
    assert first["text"] == join_spoken("Paris is the capital of France.", "巴黎很美。")
    second_request = llm.requests[1]
    assert second_request[0]["content"].endswith("Always reply in English.")
    assert second_request[1:] == [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris is the capital of France."},
        {"role": "user", "content": "Thanks!"},
    ]
