"""An OpenAI-compatible chat endpoint and a chat page for one adapted model (``lav2 serve``).

``api`` is the FastAPI app (chat completions, models, health, the page), ``schema`` the request
shape, ``conversation`` turns OpenAI messages into the model's chat, ``worker`` runs every
generation on one worker thread (batching greedy requests), ``served`` loads the model and
says which one it is, ``errors`` answers failures in OpenAI's error shape.
"""
