"""Talk to hetserve with the official `openai` package (start the leader with --http).

    hetserve up --http 127.0.0.1:8000 &
    python examples/openai_client.py
"""

from openai import OpenAI

client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
model = client.models.list().data[0].id

reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Name three rivers."}],
                                       max_tokens=64, temperature=0)
print(reply.choices[0].message.content)

stream = client.completions.create(model=model, prompt="Once upon a time", max_tokens=48, stream=True, seed=1)
for chunk in stream:
    print(chunk.choices[0].text, end="", flush=True)
print()
