"""A few KB of plain modern English prose (composed for these tests), used as the fine-tuning corpus: far from
the Shakespeare the tiny base model is pretrained on, and repetitive enough in topic that a few adapter steps
lower its held-out perplexity."""

TEXT = """The lighthouse keeper woke before dawn and climbed the spiral stairs to the lamp room.
He wiped the salt from the glass, checked the oil, and wrote the time in the logbook.
The sea was calm that morning, and the gulls were already circling the harbour.
After breakfast he walked down to the harbour to meet the supply boat.
The boat brought bread, coffee, lamp oil, letters, and a newspaper from the mainland.
He carried the boxes up the path one at a time, resting at the bend where the path turned.
In the afternoon he painted the railing on the gallery, because the wind had stripped the old paint.
The railing was white again by evening, and he wrote the work in the logbook.
When the sun went down he lit the lamp and wound the clockwork that turned the lens.
The beam swept across the water every ten seconds, as it had done for a hundred years.
Ships passing in the night counted the flashes and knew exactly where they were.
The keeper sat in the watch room with a cup of coffee and listened to the wind.
At midnight he climbed the stairs again to trim the wick and clean the glass.
The weather changed after midnight, and a storm came in from the west.
Rain beat against the windows, and the waves broke high over the rocks below the tower.
The keeper watched the lamp all night, because a storm is when the ships need the light most.
In the morning the storm had passed, and the sea was grey and quiet again.
He walked around the island to look for damage and found a broken shutter on the store house.
He repaired the shutter with new hinges and two long nails from the tool box.
Then he wrote in the logbook that the storm had passed and the light had not failed.
The supply boat came again on Friday with bread, coffee, lamp oil, and letters.
One of the letters was from his sister, who lived in a small town on the mainland.
She wrote that the apple trees were in flower and that the children were growing tall.
He read the letter twice at the kitchen table and then put it in the drawer with the others.
On Sunday he rested, read the newspaper, and walked along the shore to look at the birds.
The gulls nested on the cliffs, and the terns fished in the shallow water near the rocks.
In the evening he lit the lamp, wound the clockwork, and watched the beam sweep across the water.
The keeper had lived on the island for twelve years, and he knew every rock and every tide.
He knew when the fog would come, and he knew how the wind sounded before a storm.
When the fog came he started the fog horn, which sounded every thirty seconds until the fog lifted.
The fog horn was loud, and the sound carried far across the water to the ships.
Ships in the fog listened for the horn and kept away from the rocks.
In winter the days were short, and the lamp burned for sixteen hours every night.
The keeper used more oil in winter, so the supply boat brought more oil in the autumn.
He stored the oil in the store house beside the tower, in tall metal cans with tight lids.
Every morning he wrote the weather, the wind, and the hours of the light in the logbook.
The logbook was kept on the desk in the watch room, beside the barometer and the clock.
Inspectors came from the mainland once a year to read the logbook and inspect the lamp.
They always found the glass clean, the brass polished, and the logbook complete.
The keeper was proud of his work, because the light had never failed while he kept it.
In spring the supply boat brought seeds, and he planted potatoes and beans behind the house.
The garden was small, and the wind was strong, so he built a low stone wall around it.
In summer the beans climbed the wall, and he ate them with bread and fresh fish.
He caught the fish from the rocks in the evening, before it was time to light the lamp.
At night he climbed the stairs, lit the lamp, wound the clockwork, and watched the sea.
The beam swept across the water every ten seconds, and the ships passed safely in the dark.
"""
