// An agent in Node that never touches Redis: it uses the cortex-flow gateway.
// Beats with POST /v1/agents/<agent>/heartbeat, reads its inbox over the WebSocket
// GET /v1/agents/<agent>/inbox with credit, replies with POST /v1/streams/inbox?agent=<sender>
// and acknowledges each message by ID once its reply is published.
//
//   GATEWAY_URL=http://127.0.0.1:8480 AGENT=webby TOKEN=$WEBBY_TOKEN node gateway-agent.mjs
//
// STOP_AFTER=N makes it exit after N messages (the test uses it).
import WebSocket from "ws";

const env = (name, fallback) => process.env[name] ?? fallback;
const base = env("GATEWAY_URL", "http://127.0.0.1:8480");
const agent = env("AGENT", "webby");
const stopAfter = Number(env("STOP_AFTER", "0"));
const auth = { Authorization: `Bearer ${env("TOKEN", "")}` };

async function post(path, body) {
  const resp = await fetch(`${base}${path}`, {
    method: "POST",
    headers: { ...auth, "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
  if (resp.status !== 202) throw new Error(`${path}: ${resp.status} ${await resp.text()}`);
  return resp.json();
}

await post(`/v1/agents/${agent}/heartbeat`, { status: "ok" });
const beating = setInterval(
  () => post(`/v1/agents/${agent}/heartbeat`, {}).catch((e) => console.error(`beat: ${e.message}`)),
  1000,
);

const ws = new WebSocket(`${base.replace(/^http/, "ws")}/v1/agents/${agent}/inbox`, { headers: auth });
let done = 0;
ws.on("open", () => ws.send(JSON.stringify({ credit: 10 })));
ws.on("message", async (data) => {
  const frame = JSON.parse(data.toString());
  if (frame.type === "message") {
    const { from, text } = frame.msg;
    if (from) {
      await post(`/v1/streams/inbox?agent=${encodeURIComponent(from)}`, {
        from: agent,
        reply_to: frame.id,
        text: String(text ?? "").toUpperCase(),
      });
    }
    ws.send(JSON.stringify({ ack: frame.id }));
  } else if (frame.type === "acked") {
    done += 1;
    ws.send(JSON.stringify({ credit: 1 }));
    if (stopAfter && done >= stopAfter) ws.close();
  } else if (frame.type === "error") {
    console.error(`gateway: ${frame.error}`);
  }
});
ws.on("close", () => {
  clearInterval(beating);
  console.log(`handled ${done}`);
});
ws.on("error", (err) => {
  console.error(`websocket: ${err.message}`);
  process.exitCode = 1;
});
