from gensynth.cli import main

raise SystemExit(main())
