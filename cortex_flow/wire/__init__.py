"""What lies in Redis and how to reach it: keys, codecs, entry IDs, message, heartbeat
and dead-letter formats, connections and the embedded server."""
