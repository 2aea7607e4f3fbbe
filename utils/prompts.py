"""The task as the model sees it: a system message explaining FinQA's DSL and the JSON answer format, a user
message with the evidence and the question, and the JSON answer as the assistant's reply.

Messages, not strings: each model's own chat template renders them (trl's trainers and our generation module
both call tokenizer.apply_chat_template), so one processed dataset serves every model.
"""
from __future__ import annotations

import json

SYSTEM_PROMPT = (
    "You answer numerical questions about a company's financial report. Write the calculation as a program "
    "in FinQA's language: steps separated by ', ', each op(arg1, arg2) with op one of add, subtract, multiply, "
    "divide, exp, greater, table_max, table_min, table_sum, table_average. Arguments are numbers from the "
    "evidence (e.g. 5829 or 3.5%), constants like const_100, or #k for the result of step k (from 0). Table "
    "ops take a row name and none. Reply with JSON only: "
    '{"program": "subtract(5829, 5735), divide(#0, 5735)", "answer": "1.6%"}'
)


def user_message(question: str, context: str) -> str:
    return f"Evidence:\n{context}\n\nQuestion: {question}"


def prompt_messages(question: str, context: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": user_message(question, context)}]


def answer_json(program: str, answer: str) -> str:
    return json.dumps({"program": program, "answer": answer}, ensure_ascii=False)


def completion_messages(program: str, answer: str) -> list[dict]:
    return [{"role": "assistant", "content": answer_json(program, answer)}]


def render_prompt(tokenizer, messages: list[dict]) -> str:
    """The prompt text exactly as the model sees it, ending where the assistant's reply begins."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
