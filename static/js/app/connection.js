// The call page's one call client (../call_client.js does the signalling), with the page's token
// and its question on a 401, and what the rest of the page asks of the call.

import { CallClient } from "../call_client.js";
import { askToken, currentToken } from "./auth.js";
import { avatarCall } from "./state.js";
import { showError } from "./status.js";

export const client = new CallClient({ token: currentToken, onUnauthorized: askToken });

// Tests read the live call's peer connection (its stats) and channel from the test hook.
Object.defineProperties(avatarCall, {
  pc: { get: () => client.pc, enumerable: true },
  channel: { get: () => client.channel, enumerable: true },
});

// Whether a call is up or being set up (hung up: false).
export function inCall() {
  return client.pc !== null;
}

export function channelOpen() {
  return client.channelOpen;
}

// Sends a message on the events channel, or says on the page that there is no call to send it on.
export function send(message) {
  if (!client.send(message)) {
    showError("Not connected.");
    return false;
  }
  return true;
}
