"""Tool definitions shared by the tool-calling tests (local engine, SDK, vLLM): a bounded weather tool the
grammar can force, and an argument-free clock."""

from __future__ import annotations

from typing import Any

CITIES = ["Paris", "London", "Rome"]
WEATHER_TOOL: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather of a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "enum": CITIES, "maxLength": 10}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
TIME_TOOL: Any = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
}
TOOLS = [WEATHER_TOOL, TIME_TOOL]
