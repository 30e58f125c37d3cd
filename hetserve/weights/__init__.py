"""Weight streaming: a manifest of content hashes, a verified host cache, chunked transfer."""
