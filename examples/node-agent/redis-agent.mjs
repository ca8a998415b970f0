// An agent in Node that speaks Redis itself, per docs/spec.md ("Agents in other languages"):
// reads its inbox as consumer <agent> of its group (own pending entries first, then new
// ones), beats on the heartbeat stream, replies to the sender's inbox and acknowledges.
//
//   REDIS_URL=redis://127.0.0.1:6379 AGENT=noder INBOX_KEY=cortex:inbox:noder \
//   INBOX_PREFIX=cortex:inbox: HEARTBEATS_KEY=cortex:heartbeats node redis-agent.mjs
//
// STOP_AFTER=N makes it exit after N messages (the test uses it).
import { createClient } from "redis";

const env = (name, fallback) => process.env[name] ?? fallback;
const agent = env("AGENT", "noder");
const inbox = env("INBOX_KEY", `cortex:inbox:${agent}`);
const group = env("GROUP", agent); // agents.<agent>.inbox.group, default the agent's name
const inboxPrefix = env("INBOX_PREFIX", "cortex:inbox:");
const heartbeats = env("HEARTBEATS_KEY", "cortex:heartbeats");
const stopAfter = Number(env("STOP_AFTER", "0"));

const redis = createClient({ url: env("REDIS_URL", "redis://127.0.0.1:6379") });
redis.on("error", (err) => console.error(`redis: ${err.message}`));
await redis.connect();

async function beat(status = "ok") {
  await redis.xAdd(heartbeats, "*", { agent, kind: "agent", status, ts: String(Date.now()) });
}

try {
  await redis.xGroupCreate(inbox, group, "0", { MKSTREAM: true });
} catch (err) {
  if (!String(err.message).startsWith("BUSYGROUP")) throw err; // `run` created it: fine
}

await beat();
const beating = setInterval(() => beat().catch((e) => console.error(`beat: ${e.message}`)), 1000);

async function handle(id, fields) {
  // a reply goes to the sender's inbox, naming the entry it answers
  if (fields.from) {
    await redis.xAdd(`${inboxPrefix}${fields.from}`, "*", {
      from: agent,
      reply_to: id,
      text: String(fields.text ?? "").toUpperCase(),
    });
  }
  await redis.xAck(inbox, group, id);
}

let done = 0;
let cursor = "0"; // own pending entries first (after a crash), then new ones
while (!stopAfter || done < stopAfter) {
  const reply = await redis.xReadGroup(group, agent, { key: inbox, id: cursor }, {
    COUNT: 10,
    BLOCK: cursor === ">" ? 1000 : undefined,
  });
  const messages = reply?.[0]?.messages ?? [];
  if (cursor !== ">" && messages.length === 0) {
    cursor = ">";
    continue;
  }
  for (const { id, message } of messages) {
    await handle(id, message);
    done += 1;
  }
}
clearInterval(beating);
await beat("stopped");
await redis.quit();
console.log(`handled ${done}`);
