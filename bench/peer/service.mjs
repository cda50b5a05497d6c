// A 3-step no-op Restate service: `noop3/run` journals three `ctx.run` steps, each a no-op
// whose (null) result Restate stores before the handler goes on, like the checkpoint of
// each step of Drover's 3-step no-op workflow. Served over HTTP/2 (h2c) on PORT by
// PROCESSES node processes sharing the port (node:cluster), default 2.
import cluster from "node:cluster";
import http2 from "node:http2";
import * as restate from "@restatedev/restate-sdk";

const port = Number(process.env.PORT ?? 9080);
const processes = Number(process.env.PROCESSES ?? 2);

if (cluster.isPrimary && processes > 1) {
  for (let i = 0; i < processes; i++) cluster.fork();
  cluster.on("exit", (worker, code) => {
    console.error(`service process ${worker.process.pid} exited with ${code}`);
    process.exit(1);
  });
} else {
  const noop3 = restate.service({
    name: "noop3",
    handlers: {
      run: async (ctx) => {
        await ctx.run("one", async () => null);
        await ctx.run("two", async () => null);
        await ctx.run("three", async () => null);
        return "done";
      },
    },
  });
  const handler = restate.createEndpointHandler({ services: [noop3] });
  http2.createServer(handler).listen(port, "127.0.0.1", () => {
    console.log(`listening on 127.0.0.1:${port}`);
  });
}
