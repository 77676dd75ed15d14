"""Request validation at the edge, and the mapping onto vLLM's sampling parameters."""

import pytest
from pydantic import ValidationError

from helios.api.protocol import ChatCompletionRequest, CompletionRequest
from helios.errors import InvalidRequest


def test_completion_defaults_follow_openai() -> None:
    req = CompletionRequest.model_validate({"model": "m", "prompt": "hi"})
    assert req.max_tokens == 16 and req.stream is False and not req.include_usage
    assert req.sampling(req.max_tokens) == {"max_tokens": 16, "ignore_eos": False, "min_tokens": 0,
                                            "skip_special_tokens": True, "include_stop_str_in_output": False}


def test_set_fields_pass_through_and_unknown_fields_are_ignored() -> None:
    req = CompletionRequest.model_validate({"model": "m", "prompt": [1, 2], "temperature": 0, "top_k": 5,
                                            "stop": "x", "seed": 7, "user": "someone", "ignore_eos": True})
    params = req.sampling(4)
    assert params["temperature"] == 0 and params["top_k"] == 5 and params["stop"] == ["x"] and params["seed"] == 7
    assert params["ignore_eos"] is True and "user" not in params


def test_single_prompt_in_a_list_is_unwrapped_and_batches_are_refused() -> None:
    assert CompletionRequest.model_validate({"model": "m", "prompt": ["one"]}).prompt == "one"
    assert CompletionRequest.model_validate({"model": "m", "prompt": [[5, 6]]}).prompt == [5, 6]
    with pytest.raises(ValidationError, match="one prompt per request"):
        CompletionRequest.model_validate({"model": "m", "prompt": ["a", "b"]})


@pytest.mark.parametrize("field, value", [("n", 2), ("echo", True), ("suffix", "x"), ("temperature", 3),
                                          ("stop", ["a"] * 17), ("max_tokens", -1)])
def test_unsupported_or_out_of_range_values_fail_on_their_field(field: str, value: object) -> None:
    with pytest.raises(ValidationError) as info:
        CompletionRequest.model_validate({"model": "m", "prompt": "x", field: value})
    assert info.value.errors()[0]["loc"][0] == field


def test_logprobs_are_refused_clearly_rather_than_ignored() -> None:
    req = CompletionRequest.model_validate({"model": "m", "prompt": "x", "logprobs": 2})
    with pytest.raises(InvalidRequest) as info:
        req.sampling(1)
    assert info.value.param == "logprobs"


def test_chat_max_completion_tokens_wins_and_parts_join() -> None:
    req = ChatCompletionRequest.model_validate({
        "model": "m", "max_tokens": 5, "max_completion_tokens": 9,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
    })
    assert req.token_limit() == 9
    assert req.messages[0].text() == "ab"
    assert ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user"}]}).token_limit() is None
