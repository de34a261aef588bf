// The JavaScript side of the load tool's `reconnect_storm` (benches/load): holds COUNT clients
// of this package in Node, each reconnecting on its own after the gateway restarts, with the
// package's full-jitter backoff (JITTER=1) or with every wait at its cap (JITTER=0: all come back
// at the same instant, the storm jitter prevents). Writes the connection attempts made so far
// to FILE every 20 ms. Needs `npm ci && npm run build` in clients/js first.
//
//   node clients/js/bench/storm.mjs URL COUNT JITTER FILE
import { renameSync, writeFileSync } from "node:fs";
import WebSocket from "ws";
import { DuplexClient } from "../dist/index.js";

const [url, countText, jitterText, file] = process.argv.slice(2);
const count = Number(countText);
const reconnect = jitterText === "1" ? {} : { random: () => 1 };
let attempts = 0;
const clients = [];
for (let i = 0; i < count; i += 100) {
  const batch = [];
  for (let j = i; j < Math.min(count, i + 100); j++) {
    batch.push(
      DuplexClient.connect(url, {
        WebSocket,
        reconnect,
        onStatus: (event) => {
          if (event.state === "connecting") attempts += 1;
        },
      }).catch((e) => {
        console.error(`storm.mjs: ${e.message}`);
        return null;
      }),
    );
  }
  for (const client of await Promise.all(batch)) if (client) clients.push(client);
}
// Whole or not at all: written beside, then renamed over.
setInterval(() => {
  writeFileSync(`${file}.next`, String(attempts));
  renameSync(`${file}.next`, file);
}, 20);
