"""ICE host candidates are chosen per peer connection (``Settings.ice_host_addresses`` for the
server's, loopback for the test callers'), not pinned for the whole process."""

from __future__ import annotations

import asyncio

import aiohttp
from aiortc import RTCConfiguration, RTCPeerConnection

from avatar_rtc.rtc.ice import host_candidates
from avatar_rtc.testing.receiver import CallReceiver


def _candidate_addresses(sdp: str) -> set[str]:
    # a=candidate:<foundation> <component> <transport> <priority> <address> <port> typ <type> ...
    return {line.split()[4] for line in sdp.splitlines() if line.startswith("a=candidate:")}


async def _offer_on(addresses: tuple[str, ...]) -> set[str]:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.createDataChannel("events")
    pc.addTransceiver("audio")
    try:
        with host_candidates(addresses):
            await pc.setLocalDescription(await pc.createOffer())
        return _candidate_addresses(pc.localDescription.sdp)
    finally:
        await pc.close()


async def test_connections_set_up_together_keep_their_own_addresses() -> None:
    # 127.0.0.2 is loopback too on Linux: nothing leaves the machine.
    first, second = await asyncio.gather(_offer_on(("127.0.0.1",)), _offer_on(("127.0.0.2",)))
    assert first == {"127.0.0.1"}
    assert second == {"127.0.0.2"}


async def test_the_server_offers_the_configured_addresses(make_server) -> None:
    server = await make_server(settings={"ice_host_addresses": ["127.0.0.2"]})
    receiver = CallReceiver()
    answers: list[str] = []
    async with aiohttp.ClientSession() as http:

        async def post(offer) -> dict:
            async with http.post(f"{server.url}/offer", json={"sdp": offer.sdp, "type": offer.type}) as resp:
                reply = await resp.json()
            answers.append(reply["sdp"])
            return reply

        await receiver.connect(post)
    await receiver.wait_event(lambda e: e["type"] == "hello")
    await receiver.close()
    assert _candidate_addresses(answers[0]) == {"127.0.0.2"}
    assert _candidate_addresses(receiver.pc.localDescription.sdp or "") <= {"127.0.0.1"}
