// Runs one AG-UI run against Chorus with the official client (@ag-ui/client's HttpAgent) and prints, as one
// JSON line, every event the client passed on (after its own verification of the event order), the messages
// it holds at the end, and the run's result or error. tests/test_agui.py starts it.
//
//   node run-agent.mjs '{"url": "...", "token": "...", "threadId": "...", "runId": "...",
//                        "messages": [...], "abortAfter": "TOOL_CALL_RESULT"}'
//
// With `abortAfter`, the run is aborted as soon as an event of that type arrives (a client that lost its
// connection), and the same run is then started again: what a reconnecting client does.
import { HttpAgent } from "@ag-ui/client";

const config = JSON.parse(process.argv[2]);

function agentFor(messages) {
  return new HttpAgent({
    url: config.url,
    headers: { Authorization: `Bearer ${config.token}` },
    threadId: config.threadId,
    initialMessages: messages,
  });
}

async function run(agent, abortAfter) {
  const events = [];
  let error = null;
  let result;
  try {
    const outcome = await agent.runAgent(
      { runId: config.runId },
      {
        onEvent({ event }) {
          events.push(event);
          if (abortAfter && event.type === abortAfter) agent.abortRun();
        },
        onRunFailed({ error: failure }) {
          error = String(failure?.message ?? failure);
        },
      },
    );
    result = outcome.result;
  } catch (failure) {
    error = error ?? String(failure?.message ?? failure);
  }
  return { events, error, result, messages: agent.messages };
}

const first = await run(agentFor(config.messages), config.abortAfter);
const output = { first };
if (config.abortAfter) {
  output.again = await run(agentFor(config.messages), null);
}
process.stdout.write(JSON.stringify(output) + "\n");
