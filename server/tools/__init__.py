"""Tool calling, the output side: the grammar that forces a call (tool_choice "required" or a named
function), the parsers that find calls in free text (tool_choice "auto") and the OpenAI `tool_calls` built
from either, whole or as stream deltas. Torch-free and HTTP-free: the request schemas import it."""
