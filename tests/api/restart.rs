use crate::helpers::*;

#[tokio::test]
async fn resume_after_restart_on_the_same_database_loses_and_repeats_nothing() {
    for db in test_dbs().await {
        let app = spawn_app(&db, &[]).await;
        let zone = app.create_zone("A").await;
        let item = app.create_item(zone, "S", 100, 0).await;
        for _ in 0..9 {
            app.delta(item, -1).await;
        }
        let path = format!("/sse/zones/{zone}/stock");
        let mut sse = app.sse(&path, Some("0")).await;
        let seen = sse.take(10).await;
        assert_consecutive(&seen, 1, &format!("zone:{zone}"));
        app.stop().await;
        sse.assert_ends().await;

        let app = spawn_app(&db, &[]).await;
        for _ in 0..5 {
            app.delta(item, -1).await;
        }
        let mut sse = app.sse(&path, Some("10")).await;
        let frames = sse.take(5).await;
        assert_consecutive(&frames, 11, &format!("zone:{zone}"));
        assert_eq!(frames[4].data["data"]["quantity"], 86);
        app.delta(item, -1).await;
        assert_eq!(sse.next().await.seq(), 16, "no duplicate, no gap");
        app.stop().await;
    }
}
