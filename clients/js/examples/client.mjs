#!/usr/bin/env node
// An example client: calls `echo`, `count` and `add` (streamed input) on an endpoint published
// by examples/backend.mjs, and prints one JSON line per result:
//
//   node examples/client.mjs --url ws://127.0.0.1:8080 --path /demo --secret s3cret
//   {"echo":{"hello":"js"}}
//   {"count":[1,2,3]}
//   {"add":6}
//
// Exits 0 on success, 1 on any failure (2 when it takes more than --timeout-ms, default 10 000).

import { DuplexClient } from "../dist/index.js";
import { parseArgs, webSocketImpl } from "./args.mjs";

const args = parseArgs(process.argv.slice(2), { url: "ws://127.0.0.1:8080", path: "/demo", "timeout-ms": "10000" });

const timer = setTimeout(() => {
  console.error("timed out");
  process.exit(2);
}, Number(args["timeout-ms"]));

try {
  const client = await DuplexClient.connect(args.url.replace(/\/+$/, "") + args.path, {
    secret: args.secret,
    token: args.token,
    reconnect: false,
    WebSocket: await webSocketImpl(),
  });
  console.log(JSON.stringify({ echo: await client.call("echo", { hello: "js" }) }));
  const count = [];
  for await (const n of client.stream("count", 3)) count.push(n);
  console.log(JSON.stringify({ count }));
  console.log(JSON.stringify({ add: await client.callWithInput("add", [1, 2, 3]) }));
  await client.close();
  clearTimeout(timer);
  process.exit(0);
} catch (error) {
  console.error(`failed: ${error.name}: ${error.message}`);
  process.exit(1);
}
