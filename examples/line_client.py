"""A minimal line-protocol client with nothing but the standard library.

    python examples/line_client.py "Why is the sky blue?" --server 127.0.0.1:5556
"""

import argparse
import json
import socket


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("prompt")
    parser.add_argument("--server", default="127.0.0.1:5556")
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()
    host, port = args.server.rsplit(":", 1)
    with socket.create_connection((host, int(port))) as sock, sock.makefile("rwb") as conn:
        request = {"id": "r1", "messages": [{"role": "user", "content": args.prompt}], "max_tokens": args.max_tokens}
        conn.write((json.dumps(request) + "\n").encode())
        conn.flush()
        for line in conn:
            event = json.loads(line)
            if event["event"] == "token":
                print(event["text"], end="", flush=True)
            elif event["event"] == "done":
                print(f"\n[{event['finish_reason']}, {event['usage']}]")
                break
            elif event["event"] == "error":
                raise SystemExit(f"error: {event['error']['code']}: {event['error']['message']}")


if __name__ == "__main__":
    main()
